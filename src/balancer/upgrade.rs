//! HTTP/1.1 upgrades through the proxy (WebSocket and any other protocol
//! asked for with `Upgrade`), and CONNECT refused.
//!
//! An upgrade request goes to the next instance in rotation on a connection
//! of its own: a connection that changes protocol never goes back to a
//! pool. When the instance answers 101, both connections are handed over
//! (the client's by hyper) and their bytes are copied both ways until each
//! side has closed. The
//! exchange counts as one request (its 101) and its outcome feeds the
//! instance's passive health like any other. It is not retried elsewhere:
//! an upgrade is a conversation with one instance.
//!
//! CONNECT asks the proxy to open a tunnel to any host: no route can allow
//! that today, so it is always answered 405.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::limits::IdleBody;
use super::outlier::Outcome;
use super::proxy::{forwarded, strip_hop_by_hop, ClientBody};
use super::rotation::Member;
use super::upstream::{
    Forwarded, PooledBody, RequestBody, RequestHead, Upgraded, UpstreamConnectError, UpstreamError,
};
use super::Shared;
use crate::metrics::UpstreamFailure;

/// The largest body of an instance's refusal to upgrade that is passed on;
/// such answers are short error pages, read whole since the connection
/// they came on is not pooled.
pub(crate) const REFUSAL_LIMIT: usize = 64 * 1024;

/// Methods the proxy forwards, for the `Allow` header of its 405.
const ALLOW: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE");

/// Whether `parts` asks to switch protocols: HTTP/1.1 with an `Upgrade`
/// header that `Connection` names (RFC 9110 §7.8).
pub(crate) fn is_upgrade(parts: &http::request::Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether the request is a CONNECT, which no route allows.
pub(crate) fn is_connect(parts: &http::request::Parts) -> bool {
    parts.method == Method::CONNECT
}

/// The answer to a CONNECT.
pub(crate) fn connect_refused() -> Response<ClientBody> {
    let text = "CONNECT is not allowed: this proxy tunnels only to the instances of its routes\n";
    let mut response = answer(StatusCode::METHOD_NOT_ALLOWED, text.to_owned());
    response.headers_mut().insert(header::ALLOW, ALLOW);
    response
}

/// How long an upgrade may take to connect and to get its answer's head,
/// and how large that head may be.
pub(super) struct Bounds {
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub head_limit: usize,
}

/// Sends the upgrade `request` to the next instance of service `index` and,
/// when it switches protocols, splices the two connections together.
pub(super) async fn forward(
    shared: &Shared,
    index: usize,
    mut request: Request<Incoming>,
    client_ip: HeaderValue,
    bounds: Bounds,
) -> Response<ClientBody> {
    let upstream_timeout = bounds.upstream_timeout;
    let service = &shared.routes.services()[index];
    let rotation = &shared.rotations[index];
    let set = rotation.load_full();
    let Some(member) = set.next(|| tokio::time::Instant::now().into_std()) else {
        let text = format!("service {service:?} has no live instance\n");
        shared
            .metrics
            .own_answer(Some(index), StatusCode::SERVICE_UNAVAILABLE);
        return answer(StatusCode::SERVICE_UNAVAILABLE, text);
    };
    let began = std::time::Instant::now();
    let client = hyper::upgrade::on(&mut request);
    let request = upstream_request(request, client_ip, upstream_timeout);
    let exchange = exchange(member, request, &bounds);
    let result = tokio::time::timeout(upstream_timeout, exchange)
        .await
        .unwrap_or(Err(UpgradeError::TimedOut(upstream_timeout)));
    let metrics = &shared.metrics;
    let instance = metrics.instance(index, member.id());
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(instance) = &instance {
                instance.failed(error.kind());
            }
            metrics.own_answer(Some(index), error.status());
            rotation.observe(metrics, service, member, error.outcome(), &error);
            let id = member.id();
            let text =
                format!("upgrade to instance {id:?} of service {service:?} failed: {error}\n");
            return answer(error.status(), text);
        }
    };
    let status = response.status();
    if let Some(instance) = &instance {
        instance.answered(status, began.elapsed());
    }
    rotation.observe(
        metrics,
        service,
        member,
        Outcome::of_status(status),
        &status,
    );
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return refusal(response).await;
    }
    let (mut parts, body) = response.into_parts();
    let Some(upstream) = body.upgraded() else {
        unreachable!("a 101 keeps its connection for the upgrade")
    };
    tokio::spawn(splice(
        client,
        upstream,
        service.clone(),
        member.id().to_owned(),
    ));
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    Response::from_parts(parts, ClientBody::full(Bytes::new()))
}

/// The request as it goes to the instance: forwarded headers added,
/// hop-by-hop ones dropped except the upgrade itself. Its body, if any, may
/// pause at most `body_timeout`.
fn upstream_request(
    request: Request<Incoming>,
    client_ip: HeaderValue,
    body_timeout: Duration,
) -> (Request<RequestBody>, Forwarded) {
    let (mut parts, body) = request.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let forwarded = forwarded(&parts.uri, &parts.extensions, client_ip, None);
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.extensions = http::Extensions::new();
    let body = RequestBody::Stream(IdleBody::new(body, body_timeout));
    (Request::from_parts(parts, body), forwarded)
}

/// A connection of its own to `member`, the request, the response head.
async fn exchange(
    member: &Member,
    request: (Request<RequestBody>, Forwarded),
    bounds: &Bounds,
) -> Result<Response<PooledBody>, UpgradeError> {
    let connection = member
        .upstream
        .open(bounds.connect_timeout)
        .await
        .map_err(UpgradeError::Connect)?;
    let (request, forwarded) = request;
    let (parts, body) = request.into_parts();
    let head = RequestHead {
        method: &parts.method,
        target: parts.uri.path_and_query().map_or("/", |path| path.as_str()),
        headers: &parts.headers,
        forwarded: &forwarded,
    };
    connection
        .upgrade(head, body, bounds.head_limit)
        .await
        .map_err(UpgradeError::Exchange)
}

/// The instance's answer other than 101, passed on whole.
async fn refusal(response: Response<PooledBody>) -> Response<ClientBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    match Limited::new(body, REFUSAL_LIMIT).collect().await {
        Ok(body) => Response::from_parts(parts, ClientBody::full(body.to_bytes())),
        Err(error) => answer(
            StatusCode::BAD_GATEWAY,
            format!("the instance refused the upgrade with an unreadable answer: {error}\n"),
        ),
    }
}

/// Copies bytes both ways between the client and the instance once the
/// client's connection is handed over (what the instance sent past its 101
/// first), until each side has closed.
async fn splice(client: OnUpgrade, upstream: Upgraded, service: String, instance: String) {
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%service, %instance, %error, "upgrade not completed");
            return;
        }
    };
    let Upgraded {
        stream: mut upstream,
        read_ahead,
    } = upstream;
    let mut client = TokioIo::new(client);
    let copied = async {
        client.write_all(&read_ahead).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    match copied.await {
        Ok((sent, received)) => {
            tracing::debug!(%service, %instance, sent, received, "upgraded connection closed")
        }
        Err(error) => {
            tracing::debug!(%service, %instance, %error, "upgraded connection ended with an error")
        }
    }
}

/// Why an upgrade could not reach its instance.
#[derive(Debug, thiserror::Error)]
enum UpgradeError {
    #[error("cannot connect")]
    Connect(#[source] UpstreamConnectError),
    #[error("no answer")]
    Exchange(#[source] UpstreamError),
    #[error("no response head within {0:?}")]
    TimedOut(Duration),
}

impl UpgradeError {
    fn outcome(&self) -> Outcome {
        match self {
            UpgradeError::Connect(_) => Outcome::ConnectFailure,
            UpgradeError::Exchange(_) | UpgradeError::TimedOut(_) => Outcome::GatewayFailure,
        }
    }

    /// How Prometheus is told the attempt failed.
    fn kind(&self) -> UpstreamFailure {
        match self {
            UpgradeError::Connect(_) => UpstreamFailure::connect,
            UpgradeError::TimedOut(_) => UpstreamFailure::timeout,
            UpgradeError::Exchange(_) => UpstreamFailure::broken,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            UpgradeError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

fn answer(status: StatusCode, text: String) -> Response<ClientBody> {
    let mut response = Response::new(ClientBody::full(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut request = Request::get("/chat").version(version);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn an_upgrade_needs_the_header_named_in_connection_on_http_1_1() {
        let asks = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(is_upgrade(&parts(Version::HTTP_11, &asks)));
        assert!(!is_upgrade(&parts(Version::HTTP_10, &asks)));
        assert!(!is_upgrade(&parts(
            Version::HTTP_11,
            &[("upgrade", "websocket")]
        )));
        assert!(!is_upgrade(&parts(
            Version::HTTP_11,
            &[("connection", "upgrade")]
        )));
    }

    #[test]
    fn connect_is_answered_405_with_the_methods_allowed() {
        let response = connect_refused();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], ALLOW);
    }
}
