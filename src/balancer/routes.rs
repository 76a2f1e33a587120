//! Routing, the balancer's first decision: the `ROUTE` arguments, checked
//! once at start, turn a request's host and path into the service whose set
//! it goes to.
//!
//! A route is `SERVICE`, `/PATH=SERVICE`, `HOST=SERVICE` or
//! `HOST/PATH=SERVICE`. The most specific match wins: a route naming the
//! request's host beats one that names none, and among those, the longest
//! matching path prefix wins; a bare `SERVICE` catches everything else.
//! Paths match on segment boundaries (`/api` matches `/api` and `/api/x`,
//! not `/apix`); hosts match without their port and regardless of case.

use crate::protocol::{validate_name, ProtocolError};

/// Why a `ROUTE` argument was refused.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?} names no valid service (a route is SERVICE, /PATH=SERVICE, HOST=SERVICE or HOST/PATH=SERVICE)")]
    BadService {
        route: String,
        source: ProtocolError,
    },
    #[error("route {route:?}: the part before `=` is empty; write /PATH=SERVICE, HOST=SERVICE or just SERVICE")]
    EmptyMatch { route: String },
    #[error("route {route:?}: the host {host:?} {reason}")]
    BadHost {
        route: String,
        host: String,
        reason: &'static str,
    },
    #[error("route {route:?}: the path {path:?} {reason}")]
    BadPath {
        route: String,
        path: String,
        reason: &'static str,
    },
    #[error("route {route:?} matches the same requests as route {earlier:?}; give each host and path once")]
    Duplicate { route: String, earlier: String },
    #[error("no route given; give at least one ROUTE, e.g. `web` or `/api=api`")]
    NoRoutes,
}

/// One parsed `ROUTE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lower case, no port.
    pub host: Option<String>,
    /// Starts with `/`, no trailing `/` (except the root itself).
    pub path: Option<String>,
    pub service: String,
    /// The argument as given, for messages.
    pub text: String,
}

impl Route {
    pub fn parse(text: &str) -> Result<Route, RouteError> {
        let route = || text.to_owned();
        let (matcher, service) = match text.rsplit_once('=') {
            Some((matcher, service)) => (Some(matcher), service),
            None => (None, text),
        };
        validate_name("service", service).map_err(|source| RouteError::BadService {
            route: route(),
            source,
        })?;
        let (host, path) = match matcher {
            None => (None, None),
            Some("") => return Err(RouteError::EmptyMatch { route: route() }),
            Some(matcher) if matcher.starts_with('/') => (None, Some(matcher)),
            Some(matcher) => match matcher.find('/') {
                Some(slash) => (Some(&matcher[..slash]), Some(&matcher[slash..])),
                None => (Some(matcher), None),
            },
        };
        let host = host.map(|h| check_host(text, h)).transpose()?;
        let path = path.map(|p| check_path(text, p)).transpose()?;
        Ok(Route {
            host,
            path,
            service: service.to_owned(),
            text: text.to_owned(),
        })
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            match host {
                Some(host) if host.eq_ignore_ascii_case(want) => {}
                _ => return false,
            }
        }
        match &self.path {
            None => true,
            Some(prefix) => path_has_prefix(path, prefix),
        }
    }
}

fn check_host(route: &str, host: &str) -> Result<String, RouteError> {
    let bad = |reason| RouteError::BadHost {
        route: route.to_owned(),
        host: host.to_owned(),
        reason,
    };
    if host.contains(':') {
        return Err(bad(
            "has a port; give the host alone (ports are ignored when matching)",
        ));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(bad("may only hold letters, digits, `-`, `_` and `.`"));
    }
    Ok(host.to_ascii_lowercase())
}

fn check_path(route: &str, path: &str) -> Result<String, RouteError> {
    let bad = |reason| RouteError::BadPath {
        route: route.to_owned(),
        path: path.to_owned(),
        reason,
    };
    if path.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
        return Err(bad("may not hold spaces, `?` or `#`"));
    }
    if path.contains("//") {
        return Err(bad("has an empty segment (`//`)"));
    }
    let trimmed = path.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// `/api` is a prefix of `/api` and `/api/x` but not of `/apix`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The routes, most specific first, each with the index of its service in
/// [`Routes::services`].
#[derive(Debug, Clone)]
pub struct Routes {
    ordered: Vec<(Route, usize)>,
    services: Vec<String>,
    /// Whether any route names a host; when none does, a request's host
    /// is not looked at.
    any_host: bool,
}

impl Routes {
    /// Parses every `ROUTE` argument; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(arguments: &[S]) -> Result<Routes, RouteError> {
        let routes = arguments
            .iter()
            .map(|a| Route::parse(a.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Routes::new(routes)
    }

    pub fn new(routes: Vec<Route>) -> Result<Routes, RouteError> {
        if routes.is_empty() {
            return Err(RouteError::NoRoutes);
        }
        let mut services: Vec<String> = Vec::new();
        let mut ordered: Vec<(Route, usize)> = Vec::with_capacity(routes.len());
        for route in routes {
            if let Some((earlier, _)) = ordered
                .iter()
                .find(|(r, _)| r.host == route.host && r.path == route.path)
            {
                return Err(RouteError::Duplicate {
                    route: route.text.clone(),
                    earlier: earlier.text.clone(),
                });
            }
            let index = match services.iter().position(|s| *s == route.service) {
                Some(index) => index,
                None => {
                    services.push(route.service.clone());
                    services.len() - 1
                }
            };
            ordered.push((route, index));
        }
        ordered.sort_by_key(|(route, _)| {
            let path_len = route.path.as_ref().map_or(0, |p| p.len());
            std::cmp::Reverse((route.host.is_some(), route.path.is_some(), path_len))
        });
        let any_host = ordered.iter().any(|(route, _)| route.host.is_some());
        Ok(Routes {
            ordered,
            services,
            any_host,
        })
    }

    /// Every routed service, each once; [`Routes::find`] returns indices into it.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.ordered.iter().map(|(route, _)| route)
    }

    /// The service index for a request to `host` (a Host header or URI
    /// authority, port allowed) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.filter(|_| self.any_host).map(strip_port);
        self.ordered
            .iter()
            .find(|(route, _)| route.matches(host, path))
            .map(|(_, index)| *index)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: `[::1]:8080`.
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => {
            &host[..colon]
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(list: &[&str]) -> Routes {
        Routes::parse(list).expect("valid routes")
    }

    fn service<'r>(routes: &'r Routes, host: Option<&str>, path: &str) -> Option<&'r str> {
        routes
            .find(host, path)
            .map(|index| routes.services()[index].as_str())
    }

    #[test]
    fn parses_the_four_forms() {
        let bare = Route::parse("web").expect("bare");
        assert_eq!(
            (bare.host, bare.path, bare.service.as_str()),
            (None, None, "web")
        );
        let path = Route::parse("/api/=api").expect("path");
        assert_eq!(path.path.as_deref(), Some("/api"));
        assert_eq!(path.host, None);
        let host = Route::parse("Example.COM=site").expect("host");
        assert_eq!(host.host.as_deref(), Some("example.com"));
        assert_eq!(host.path, None);
        let both = Route::parse("example.com/v2=site-v2").expect("both");
        assert_eq!(both.host.as_deref(), Some("example.com"));
        assert_eq!(both.path.as_deref(), Some("/v2"));
        assert_eq!(both.service, "site-v2");
    }

    #[test]
    fn longest_prefix_wins_and_bare_catches_the_rest() {
        let table = routes(&["web", "/api=api", "/api/v2=api-v2"]);
        assert_eq!(service(&table, None, "/"), Some("web"));
        assert_eq!(service(&table, None, "/api"), Some("api"));
        assert_eq!(service(&table, None, "/api/users"), Some("api"));
        assert_eq!(service(&table, None, "/api/v2"), Some("api-v2"));
        assert_eq!(service(&table, None, "/api/v2/x"), Some("api-v2"));
        assert_eq!(service(&table, None, "/apix"), Some("web"));
        assert_eq!(service(&table, None, "/api/v2x"), Some("api"));
    }

    #[test]
    fn no_bare_route_means_no_match() {
        let table = routes(&["/api=api"]);
        assert_eq!(service(&table, None, "/other"), None);
        assert_eq!(service(&table, None, "/apix"), None);
    }

    #[test]
    fn host_routes_ignore_port_and_case_and_beat_path_routes() {
        let table = routes(&[
            "web",
            "/api=api",
            "example.com=site",
            "example.com/api=site-api",
        ]);
        assert_eq!(service(&table, Some("EXAMPLE.com:8080"), "/"), Some("site"));
        assert_eq!(
            service(&table, Some("example.com"), "/api/x"),
            Some("site-api")
        );
        assert_eq!(service(&table, Some("other.org"), "/api/x"), Some("api"));
        assert_eq!(service(&table, Some("other.org"), "/"), Some("web"));
        assert_eq!(service(&table, None, "/"), Some("web"));
        assert_eq!(service(&table, Some("[::1]:80"), "/"), Some("web"));
        // Only digits after the last colon are a port.
        assert_eq!(service(&table, Some("example.com:http"), "/"), Some("web"));
    }

    #[test]
    fn root_path_route_catches_all_paths() {
        let table = routes(&["/=root"]);
        assert_eq!(service(&table, None, "/anything"), Some("root"));
    }

    #[test]
    fn bad_routes_are_refused_naming_the_argument() {
        let cases = [
            ("", "service is empty"),
            ("web.v2", "contains '.'"),
            ("/api=", "service is empty"),
            ("=web", "before `=` is empty"),
            ("example.com:80=web", "has a port"),
            ("exa mple=web", "may only hold"),
            ("/a b=web", "may not hold spaces"),
            ("/a//b=web", "empty segment"),
        ];
        for (argument, expected) in cases {
            let error = crate::ErrorChain(&Route::parse(argument).expect_err(argument)).to_string();
            assert!(error.contains(&format!("{argument:?}")), "{error}");
            assert!(error.contains(expected), "{argument}: {error}");
        }
    }

    #[test]
    fn duplicates_and_no_routes_are_refused() {
        let error = Routes::parse(&["/api=a", "/api/=b"]).expect_err("duplicate");
        assert!(error.to_string().contains("\"/api/=b\""), "{error}");
        assert!(error.to_string().contains("\"/api=a\""), "{error}");
        assert!(Routes::parse(&["a", "b"]).is_err());
        assert!(matches!(
            Routes::parse::<&str>(&[]),
            Err(RouteError::NoRoutes)
        ));
    }

    #[test]
    fn services_are_listed_once() {
        let table = routes(&["web", "/a=api", "/b=api"]);
        assert_eq!(table.services(), ["web".to_owned(), "api".to_owned()]);
    }
}
