//! The access log, beside the proxy: one line per request once its answer
//! has been sent (or abandoned), as text or JSON, to a writer the caller
//! gives (the binary gives stdout). Off unless configured; when off the
//! proxy builds no [`Entry`] at all.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// How each line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `TIME CLIENT "METHOD PATH" STATUS BYTES DURATION_MS SERVICE INSTANCE RETRIES`,
    /// `-` for what is unknown.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where access-log lines go, and in which format.
#[derive(Clone)]
pub struct AccessLog {
    format: LogFormat,
    out: Arc<Mutex<dyn Write + Send>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    pub fn new(format: LogFormat, out: impl Write + Send + 'static) -> Self {
        AccessLog {
            format,
            out: Arc::new(Mutex::new(out)),
        }
    }

    /// Writes one line for `entry`; a failed write is reported, not fatal.
    pub(super) fn write(&self, entry: &Entry) {
        let line = match self.format {
            LogFormat::Text => entry.text(),
            LogFormat::Json => entry.json(),
        };
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!(%error, "cannot write the access log");
        }
    }
}

/// What is known of one request, filled in as it goes.
#[derive(Debug, Serialize)]
pub(super) struct Entry {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    pub service: Option<String>,
    pub instance: Option<String>,
    pub retries: u32,
}

impl Entry {
    pub(super) fn new(client: SocketAddr, method: &http::Method, uri: &http::Uri) -> Self {
        Entry {
            time: SystemTime::now(),
            client,
            method: method.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
            status: 0,
            bytes: 0,
            duration: Duration::ZERO,
            service: None,
            instance: None,
            retries: 0,
        }
    }

    fn text(&self) -> String {
        format!(
            "{} {} \"{} {}\" {} {} {:.3} {} {} {}",
            humantime::format_rfc3339_millis(self.time),
            self.client,
            self.method,
            self.path.escape_debug(),
            self.status,
            self.bytes,
            self.duration.as_secs_f64() * 1000.0,
            self.service.as_deref().unwrap_or("-"),
            self.instance.as_deref().unwrap_or("-"),
            self.retries,
        )
    }

    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn millis<S: serde::Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(duration.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut entry = Entry::new(
            "127.0.0.1:4000".parse().expect("address"),
            &http::Method::GET,
            &"/a?b=1".parse().expect("uri"),
        );
        entry.time = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        entry.status = 200;
        entry.bytes = 12;
        entry.duration = Duration::from_micros(1500);
        entry.service = Some("web".into());
        entry.retries = 1;
        entry
    }

    #[test]
    fn a_text_line_names_every_field_in_order() {
        assert_eq!(
            entry().text(),
            "1970-01-01T00:00:01.000Z 127.0.0.1:4000 \"GET /a?b=1\" 200 12 1.500 web - 1"
        );
    }

    #[test]
    fn a_json_line_is_one_object() {
        let value: serde_json::Value = serde_json::from_str(&entry().json()).expect("JSON");
        assert_eq!(value["path"], "/a?b=1");
        assert_eq!(value["status"], 200);
        assert_eq!(value["duration_ms"], 1.5);
        assert_eq!(value["instance"], serde_json::Value::Null);
        assert_eq!(value["time"], "1970-01-01T00:00:01.000Z");
    }
}
