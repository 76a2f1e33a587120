//! What NATS lets each connection do: the server's permission violations,
//! which arrive asynchronously as bare `-ERR` lines, turned into typed
//! [`PermissionDenied`] errors naming the operation, the subject and the
//! user, for `connect` to log, count and hand on; and the subscriptions each
//! role needs, for a start-up check that fails loudly instead of silently
//! receiving nothing (`nats/secure.conf` grants them; `docs/security.md`).

use std::fmt;

use crate::protocol::Subjects;

/// What the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Subscribe,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Operation::Publish => "publishing to",
            Operation::Subscribe => "subscribing to",
        }
    }
}

/// A publish or subscription the server refused for lack of permission.
///
/// Displays as `permission denied publishing to rollcall.catalog.web as user
/// balancer`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied {} {subject} as {user}; grant it in the NATS server's permissions for that user (docs/security.md)", operation.verb())]
pub struct PermissionDenied {
    pub operation: Operation,
    pub subject: String,
    /// Who the connection authenticated as: `user balancer`, `nkey UA…`,
    /// `the user of creds file app.creds`, `a token`, `no credentials`.
    pub user: String,
}

impl PermissionDenied {
    /// Reads a server error such as `Permissions Violation for Publish to
    /// "rollcall.catalog.web"` (also `... for Subscription to "x" using queue
    /// "q"`); `None` for any other error.
    pub(crate) fn from_server_error(message: &str, user: &str) -> Option<PermissionDenied> {
        // The server quotes the whole line in single quotes on the wire; some
        // client versions keep them.
        let message = message.trim().trim_matches('\'');
        let rest = strip_prefix_ignore_case(message, "permissions violation for ")?;
        let (operation, rest) = if let Some(rest) = strip_prefix_ignore_case(rest, "publish to ") {
            (Operation::Publish, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(rest, "subscription to ") {
            (Operation::Subscribe, rest)
        } else {
            return None;
        };
        let subject = rest.strip_prefix('"')?.split('"').next()?;
        Some(PermissionDenied {
            operation,
            subject: subject.to_owned(),
            user: user.to_owned(),
        })
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// One thing a component needs to be allowed to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Checked by subscribing and unsubscribing again.
    Subscribe(String),
    /// Checked by publishing an empty message: only for subjects where one is
    /// harmless (nobody parses it, or nobody listens).
    Publish(String),
}

impl Access {
    pub fn subject(&self) -> &str {
        match self {
            Access::Subscribe(subject) | Access::Publish(subject) => subject,
        }
    }

    pub fn operation(&self) -> Operation {
        match self {
            Access::Subscribe(_) => Operation::Subscribe,
            Access::Publish(_) => Operation::Publish,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.operation().verb(), self.subject())
    }
}

/// The subscriptions discovery cannot work without: every event, on one
/// subscription, the leader heartbeat (a leader that cannot hear its own
/// steps down), and the operators' overrides. (Its writes go to the catalog stream, where a probe would
/// be stored, so they are reported when they happen.)
pub fn discovery_needs(subjects: &Subjects) -> Vec<Access> {
    vec![
        Access::Subscribe(subjects.events_wildcard()),
        Access::Subscribe(subjects.leader_heartbeat()),
        Access::Subscribe(subjects.operator_wildcard()),
    ]
}

/// The subscription a balancer (and `rollcall watch`'s catalog part) cannot
/// work without: the live snapshots.
pub fn balancer_needs(subjects: &Subjects) -> Vec<Access> {
    vec![Access::Subscribe(subjects.catalog_wildcard())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_publish_and_subscription_violations() {
        let denied = PermissionDenied::from_server_error(
            "Permissions Violation for Publish to \"rollcall.catalog.web\"",
            "user balancer",
        );
        assert_eq!(
            denied,
            Some(PermissionDenied {
                operation: Operation::Publish,
                subject: "rollcall.catalog.web".into(),
                user: "user balancer".into(),
            })
        );
        let denied = PermissionDenied::from_server_error(
            "'Permissions Violation for Subscription to \"rollcall.>\" using queue \"q\"'",
            "user web",
        )
        .map(|d| (d.operation, d.subject));
        assert_eq!(denied, Some((Operation::Subscribe, "rollcall.>".into())));
    }

    #[test]
    fn other_server_errors_are_not_denials() {
        for message in [
            "Authorization Violation",
            "Permissions Violation for Publish with Reply of \"x\"",
            "Permissions Violation for Publish to rollcall.x",
            "Maximum Payload Violation",
            "",
        ] {
            assert_eq!(
                PermissionDenied::from_server_error(message, "u"),
                None,
                "{message}"
            );
        }
    }

    #[test]
    fn the_message_names_operation_subject_and_user() {
        let denied = PermissionDenied {
            operation: Operation::Publish,
            subject: "rollcall.catalog.web".into(),
            user: "user balancer".into(),
        };
        assert!(denied
            .to_string()
            .starts_with("permission denied publishing to rollcall.catalog.web as user balancer"));
    }

    #[test]
    fn roles_need_their_subscriptions() {
        let subjects = Subjects::new("rollcall").expect("valid prefix");
        let discovery: Vec<String> = discovery_needs(&subjects)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            discovery,
            [
                "subscribing to rollcall.*.*.*",
                "subscribing to rollcall.discovery.leader",
                "subscribing to rollcall.operator.>"
            ]
        );
        assert_eq!(
            balancer_needs(&subjects),
            [Access::Subscribe("rollcall.catalog.>".into())]
        );
    }
}
