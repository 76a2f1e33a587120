//! HTTP/1.1 responses from instances, as bytes: the head (parsed with
//! `httparse`) and the framing of the body that follows it (RFC 9112 §6.3),
//! chunked decoding included. Pure functions over buffers; the connection
//! that fills the buffers is [`super::upstream`].
//!
//! Strict where leniency would let an instance smuggle a second response
//! into the first, or make the proxy and the client disagree on where a
//! response ends. Refused, each with an error naming it:
//!
//! - both `Transfer-Encoding` and `Content-Length`;
//! - `Content-Length` values that differ, or one that is not a decimal
//!   number. Duplicates that agree (`5` twice, or `5, 5`) are folded into
//!   one, as hyper does;
//! - a `Transfer-Encoding` other than exactly `chunked` (a coding the proxy
//!   cannot pass on once the header is dropped as hop-by-hop), or any on an
//!   HTTP/1.0 response;
//! - a chunk-size line that is not hex, overflows 64 bits, does not end in
//!   CRLF or is longer than [`MAX_CHUNK_LINE`] (extensions included); chunk
//!   data not followed by CRLF; trailers beyond [`MAX_TRAILERS`];
//! - a head beyond its limit, with more than [`MAX_HEADERS`] fields, or of
//!   any version other than HTTP/1.0 and HTTP/1.1.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};

/// Default limit of an instance's response head, status line included
/// (Envoy `max_response_headers_kb` 60 KiB; nginx `proxy_buffer_size` is a
/// page, HAProxy's `tune.bufsize` 16 KiB).
pub const DEFAULT_HEAD_LIMIT: usize = 64 * 1024;
/// Header fields in a response head or its trailers (hyper's limit).
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions and CRLF included.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The largest trailer section (hyper's 16 KiB).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why an instance's response cannot be passed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("response head larger than the {0}-byte limit")]
    HeadTooLarge(usize),
    #[error("response head with more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("header field {0:?} is not a valid name and value")]
    Field(String),
    #[error("response with both Transfer-Encoding and Content-Length")]
    LengthAndChunked,
    #[error("response with differing Content-Length values")]
    DifferingLengths,
    #[error("invalid Content-Length {0:?}")]
    InvalidLength(String),
    #[error("Transfer-Encoding {0:?} is not chunked alone")]
    NotChunked(String),
    #[error("Transfer-Encoding on an HTTP/1.0 response")]
    ChunkedOnHttp10,
    #[error("chunk-size line is not a hex size")]
    ChunkSize,
    #[error("chunk size beyond 64 bits")]
    ChunkSizeOverflow,
    #[error("chunk-size line longer than {MAX_CHUNK_LINE} bytes")]
    ChunkLineTooLong,
    #[error("chunk-size line not ended by CRLF")]
    ChunkLineEnd,
    #[error("chunk data not followed by CRLF")]
    ChunkDataEnd,
    #[error("trailers larger than {MAX_TRAILERS} bytes")]
    TrailersTooLarge,
    #[error("malformed trailers: {0}")]
    Trailers(httparse::Error),
}

/// How the body after a head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Read until the instance closes; the connection is not reused.
    Close,
}

/// A whole response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Where one header field lies in the head.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

/// Reads heads off the front of a buffer; keeps its scratch space from one
/// head to the next.
#[derive(Debug, Default)]
pub struct HeadReader {
    fields: Vec<Field>,
}

impl HeadReader {
    /// The head at the front of `buf`, once it is whole: taken off `buf`,
    /// its header values sharing its bytes. `Ok(None)` while more is needed
    /// and `limit` is not reached. `head_request`: the request was a HEAD,
    /// so the response has no body whatever its headers say.
    pub fn take(
        &mut self,
        buf: &mut BytesMut,
        head_request: bool,
        limit: usize,
    ) -> Result<Option<Head>, ParseError> {
        take_head(buf, head_request, limit, &mut self.fields)
    }
}

fn take_head(
    buf: &mut BytesMut,
    head_request: bool,
    limit: usize,
    fields: &mut Vec<Field>,
) -> Result<Option<Head>, ParseError> {
    fields.clear();
    let (length, code, minor) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buf.len() < limit => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(ParseError::HeadTooLarge(limit)),
            Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooManyHeaders),
            Err(error) => return Err(ParseError::Head(error)),
        };
        if length > limit {
            return Err(ParseError::HeadTooLarge(limit));
        }
        let start = buf.as_ptr() as usize;
        fields.extend(response.headers.iter().map(|header| Field {
            name: (header.name.as_ptr() as usize - start, header.name.len()),
            value: (header.value.as_ptr() as usize - start, header.value.len()),
        }));
        let (Some(code), Some(minor)) = (response.code, response.version) else {
            unreachable!("a complete response head has a status and a version")
        };
        (length, code, minor)
    };
    let bytes = buf.split_to(length).freeze();
    let head = head_of(&bytes, fields, code, minor, head_request)?;
    Ok(Some(head))
}

fn head_of(
    bytes: &Bytes,
    fields: &[Field],
    code: u16,
    minor: u8,
    head_request: bool,
) -> Result<Head, ParseError> {
    let status =
        StatusCode::from_u16(code).map_err(|_| ParseError::Head(httparse::Error::Status))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(fields.len());
    // What framing and keep-alive depend on, noted in the pass that builds
    // the map rather than looked up in it afterwards.
    let mut length = None;
    let (mut chunked, mut connection) = (false, false);
    for field in fields {
        let name = &bytes[field.name.0..field.name.0 + field.name.1];
        let value = bytes.slice(field.value.0..field.value.0 + field.value.1);
        let bad = || ParseError::Field(String::from_utf8_lossy(name).into_owned());
        let name = HeaderName::from_bytes(name).map_err(|_| bad())?;
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| bad())?;
        if name == header::CONTENT_LENGTH {
            length = content_length(length, &value)?;
        } else {
            chunked |= name == header::TRANSFER_ENCODING;
            connection |= name == header::CONNECTION;
        }
        headers.append(name, value);
    }
    let framing = framing(&headers, chunked, length, status, version, head_request)?;
    let keep_alive = framing != Framing::Close
        && if connection {
            keeps_alive(&headers, version)
        } else {
            version == Version::HTTP_11
        };
    Ok(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    })
}

/// The body's framing, RFC 9112 §6.3: `chunked` when the head has a
/// `Transfer-Encoding`, `length` what its `Content-Length` says.
fn framing(
    headers: &HeaderMap,
    chunked: bool,
    length: Option<u64>,
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<Framing, ParseError> {
    if chunked && length.is_some() {
        return Err(ParseError::LengthAndChunked);
    }
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if chunked {
        if version == Version::HTTP_10 {
            return Err(ParseError::ChunkedOnHttp10);
        }
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii);
        let only_chunked = codings
            .next()
            .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        if !only_chunked {
            let all: Vec<&str> = headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .map(|value| value.to_str().unwrap_or("(not text)"))
                .collect();
            return Err(ParseError::NotChunked(all.join(", ")));
        }
        return Ok(Framing::Chunked);
    }
    Ok(match length {
        Some(length) => Framing::Length(length),
        None => Framing::Close,
    })
}

/// The one length `value`, a `Content-Length`, and the `length` of those
/// before it agree on.
fn content_length(mut length: Option<u64>, value: &HeaderValue) -> Result<Option<u64>, ParseError> {
    for item in value.as_bytes().split(|&b| b == b',') {
        let invalid = || ParseError::InvalidLength(String::from_utf8_lossy(item).into_owned());
        let digits = item.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(invalid());
        }
        let parsed = digits.iter().try_fold(0u64, |n, &digit| {
            n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        });
        let parsed = parsed.ok_or_else(invalid)?;
        match length {
            Some(earlier) if earlier != parsed => return Err(ParseError::DifferingLengths),
            _ => length = Some(parsed),
        }
    }
    Ok(length)
}

/// HTTP/1.1 keeps the connection unless it says `close`; HTTP/1.0 only
/// when it says `keep-alive`.
fn keeps_alive(headers: &HeaderMap, version: Version) -> bool {
    let mut keep = version == Version::HTTP_11;
    let tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    for token in tokens {
        if token.eq_ignore_ascii_case(b"close") {
            return false;
        }
        if token.eq_ignore_ascii_case(b"keep-alive") {
            keep = true;
        }
    }
    keep
}

/// What the body decoder found at the front of its buffer.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended (after its trailers, if any).
    End,
    /// The buffer holds no whole piece; read more.
    More,
}

/// Takes a body off the front of a buffer, piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are left.
    Length(u64),
    /// Everything until the instance closes.
    UntilClose,
    Chunked(Chunk),
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, at the trailers.
    Trailers,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => Decoder::Done,
            Framing::Length(length) => Decoder::Length(length),
            Framing::Chunked => Decoder::Chunked(Chunk::Size),
            Framing::Close => Decoder::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// The next piece of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ParseError> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decoder::Chunked(chunk) => match decode_chunk(chunk, buf)? {
                    Some(Decoded::End) => *self = Decoder::Done,
                    Some(Decoded::Trailers(trailers)) => {
                        // Trailers are the body's last piece.
                        *self = Decoder::Done;
                        return Ok(Decoded::Trailers(trailers));
                    }
                    Some(decoded) => return Ok(decoded),
                    None => {}
                },
            }
        }
    }

    /// The instance closed the connection: fine only for a body read until
    /// then.
    pub fn closed(&mut self) -> Result<(), Truncated> {
        match self {
            Decoder::Done => Ok(()),
            Decoder::UntilClose => {
                *self = Decoder::Done;
                Ok(())
            }
            Decoder::Length(left) => Err(Truncated(Some(*left))),
            Decoder::Chunked(_) => Err(Truncated(None)),
        }
    }
}

/// A body cut short by its connection closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct Truncated(Option<u64>);

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(left) => write!(
                f,
                "the connection closed {left} bytes before the body's end"
            ),
            None => write!(f, "the connection closed before the last chunk"),
        }
    }
}

/// One step of a chunked body: `Some` piece to hand out, or `None` when the
/// state moved on and the caller should look again.
fn decode_chunk(chunk: &mut Chunk, buf: &mut BytesMut) -> Result<Option<Decoded>, ParseError> {
    match *chunk {
        Chunk::Size => {
            let Some(end) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                if buf.len() >= MAX_CHUNK_LINE {
                    return Err(ParseError::ChunkLineTooLong);
                }
                return Ok(Some(Decoded::More));
            };
            let size = chunk_size(&buf[..=end])?;
            let _ = buf.split_to(end + 1);
            *chunk = if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            };
            Ok(None)
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Some(Decoded::More));
            }
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            *chunk = match left - take as u64 {
                0 => Chunk::DataEnd,
                left => Chunk::Data(left),
            };
            Ok(Some(Decoded::Data(buf.split_to(take).freeze())))
        }
        Chunk::DataEnd => match &buf[..] {
            [b'\r', b'\n', ..] => {
                let _ = buf.split_to(2);
                *chunk = Chunk::Size;
                Ok(None)
            }
            [] | [b'\r'] => Ok(Some(Decoded::More)),
            _ => Err(ParseError::ChunkDataEnd),
        },
        Chunk::Trailers => {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Complete((length, fields))) => {
                    if length > MAX_TRAILERS {
                        return Err(ParseError::TrailersTooLarge);
                    }
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for field in fields {
                        let bad = || ParseError::Field(field.name.to_owned());
                        let name =
                            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| bad())?;
                        let value = HeaderValue::from_bytes(field.value).map_err(|_| bad())?;
                        trailers.append(name, value);
                    }
                    let _ = buf.split_to(length);
                    if trailers.is_empty() {
                        Ok(Some(Decoded::End))
                    } else {
                        Ok(Some(Decoded::Trailers(trailers)))
                    }
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_TRAILERS => {
                    Ok(Some(Decoded::More))
                }
                Ok(httparse::Status::Partial) => Err(ParseError::TrailersTooLarge),
                Err(error) => Err(ParseError::Trailers(error)),
            }
        }
    }
}

/// The size on a whole chunk-size line (`line` ends with its LF):
/// `1*HEXDIG [BWS ; extensions] CRLF`.
fn chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(ParseError::ChunkLineEnd);
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ParseError::ChunkSize);
    }
    let mut size = 0u64;
    for &digit in &line[..digits] {
        let value = (digit as char).to_digit(16).unwrap_or(0);
        size = size
            .checked_mul(16)
            .and_then(|size| size.checked_add(u64::from(value)))
            .ok_or(ParseError::ChunkSizeOverflow)?;
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    let extensions_ok = rest.is_empty()
        || (rest[0] == b';'
            && rest
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)));
    if !extensions_ok {
        return Err(ParseError::ChunkSize);
    }
    Ok(size)
}

/// A response parsed whole from `input`, for fuzzing and tests: what the
/// proxy would pass on from these bytes.
#[derive(Debug)]
pub struct Parsed {
    pub head: Head,
    pub body: Vec<u8>,
    pub trailers: Option<HeaderMap>,
    /// The body reached its end within `input` (or ends at close).
    pub complete: bool,
    /// Bytes of `input` left after the response.
    pub rest: usize,
}

/// Parses `input` as the connection's whole output: a head within `limit`,
/// then its body; 1xx heads before it skipped as the proxy skips them.
/// `Ok(None)` when no whole head is in `input`.
pub fn parse_response(
    input: &[u8],
    head_request: bool,
    limit: usize,
) -> Result<Option<Parsed>, ParseError> {
    let mut buf = BytesMut::from(input);
    let mut reader = HeadReader::default();
    let head = loop {
        let Some(head) = reader.take(&mut buf, head_request, limit)? else {
            return Ok(None);
        };
        if !head.status.is_informational() || head.status == StatusCode::SWITCHING_PROTOCOLS {
            break head;
        }
    };
    let mut decoder = Decoder::new(head.framing);
    let mut body = Vec::new();
    let mut trailers = None;
    let complete = loop {
        match decoder.decode(&mut buf)? {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::Trailers(fields) => trailers = Some(fields),
            Decoded::End => break true,
            Decoded::More => break decoder.closed().is_ok(),
        }
    };
    Ok(Some(Parsed {
        head,
        body,
        trailers,
        complete,
        rest: buf.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8]) -> Result<Option<Parsed>, ParseError> {
        parse_response(input, false, DEFAULT_HEAD_LIMIT)
    }

    fn whole(input: &[u8]) -> Parsed {
        parse(input).expect("valid").expect("a whole head")
    }

    #[test]
    fn a_length_framed_body_ends_at_its_length_and_leaves_the_rest() {
        let parsed = whole(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1");
        assert_eq!(parsed.head.status, StatusCode::OK);
        assert_eq!(parsed.head.framing, Framing::Length(5));
        assert!(parsed.head.keep_alive);
        assert_eq!(parsed.body, b"hello");
        assert!(parsed.complete);
        assert_eq!(parsed.rest, 8);
    }

    #[test]
    fn a_chunked_body_is_decoded_with_its_extensions_and_trailers() {
        let parsed = whole(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;name=value\r\nhello\r\n6 \r\n world\r\n0\r\nX-Sum: 1\r\n\r\n",
        );
        assert_eq!(parsed.body, b"hello world");
        assert!(parsed.complete);
        assert_eq!(parsed.trailers.expect("trailers")["x-sum"], "1");
        assert_eq!(parsed.rest, 0);
    }

    #[test]
    fn no_body_for_head_requests_1xx_204_and_304() {
        for status in ["204 No Content", "304 Not Modified"] {
            let input = format!("HTTP/1.1 {status}\r\nContent-Length: 3\r\n\r\n");
            let parsed = whole(input.as_bytes());
            assert_eq!(parsed.head.framing, Framing::Empty, "{status}");
        }
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        let parsed = parse_response(head, true, DEFAULT_HEAD_LIMIT)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.head.framing, Framing::Empty);
        assert!(parsed.complete);
        let continued =
            whole(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!(continued.head.status, StatusCode::OK);
        assert_eq!(continued.body, b"x");
    }

    #[test]
    fn without_length_the_body_runs_to_close_and_the_connection_is_not_kept() {
        let parsed = whole(b"HTTP/1.1 200 OK\r\n\r\nall of it");
        assert_eq!(parsed.head.framing, Framing::Close);
        assert!(!parsed.head.keep_alive);
        assert_eq!(parsed.body, b"all of it");
        assert!(parsed.complete);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keeps = |input: &[u8]| whole(input).head.keep_alive;
        assert!(!keeps(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!keeps(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(keeps(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn smuggling_framings_are_refused() {
        let cases: [(&[u8], ParseError); 8] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                ParseError::LengthAndChunked,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                ParseError::DifferingLengths,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
                ParseError::DifferingLengths,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
                ParseError::InvalidLength("+3".into()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                ParseError::InvalidLength("99999999999999999999".into()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                ParseError::NotChunked("gzip".into()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                ParseError::NotChunked("chunked, identity".into()),
            ),
            (
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                ParseError::ChunkedOnHttp10,
            ),
        ];
        for (input, error) in cases {
            assert_eq!(
                parse(input).unwrap_err(),
                error,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let folded =
            whole(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok");
        assert_eq!(
            folded.head.framing,
            Framing::Length(2),
            "agreeing duplicates fold"
        );
    }

    #[test]
    fn bad_chunks_are_refused() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        let big_trailers = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        let cases: [(&[u8], ParseError); 7] = [
            (b"zz\r\n", ParseError::ChunkSize),
            (b"12345678901234567\r\n", ParseError::ChunkSizeOverflow),
            (b"5\nhello\r\n0\r\n\r\n", ParseError::ChunkLineEnd),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ParseError::ChunkDataEnd),
            (b"5 x\r\nhello\r\n", ParseError::ChunkSize),
            (long.as_bytes(), ParseError::ChunkLineTooLong),
            (big_trailers.as_bytes(), ParseError::TrailersTooLarge),
        ];
        for (body, error) in cases {
            let input = [&head[..], body].concat();
            assert_eq!(
                parse(&input).unwrap_err(),
                error,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn heads_beyond_the_limit_or_of_other_versions_are_refused() {
        let big = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "v".repeat(200));
        assert_eq!(
            parse_response(big.as_bytes(), false, 100).unwrap_err(),
            ParseError::HeadTooLarge(100)
        );
        let partial = format!("HTTP/1.1 200 OK\r\nX: {}", "v".repeat(200));
        assert_eq!(
            parse_response(partial.as_bytes(), false, 100).unwrap_err(),
            ParseError::HeadTooLarge(100)
        );
        assert!(parse_response(&partial.as_bytes()[..50], false, 100)
            .unwrap()
            .is_none());
        assert!(matches!(
            parse(b"HTTP/2.0 200 OK\r\n\r\n"),
            Err(ParseError::Head(httparse::Error::Version))
        ));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let input = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(
            parse(input.as_bytes()).unwrap_err(),
            ParseError::TooManyHeaders
        );
    }

    #[test]
    fn a_body_cut_short_is_incomplete() {
        let parsed = whole(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
        assert!(!parsed.complete);
        let chunked = whole(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
        assert!(!chunked.complete);
        assert_eq!(chunked.body, b"hel");
    }

    /// xorshift64*: a fixed seed, so a failure is repeatable.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const PIECES: [&[u8]; 24] = [
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 204 No Content\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\n",
        b"Content-Length: 5\r\n",
        b"Content-Length: 5, 5\r\n",
        b"Content-Length: 7\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"Connection: keep-alive\r\n",
        b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        b"\r\n",
        b"hello",
        b"5\r\nhello\r\n",
        b"0\r\n\r\n",
        b"0\r\nX-T: 1\r\n\r\n",
        b"ffffffffffffffffff\r\n",
        b"3;ext=1\r\nabc\r\n",
        b"\n",
        b" ",
        b"\x00\xff",
    ];

    /// Invariants over random inputs built from HTTP pieces and then
    /// mutated: no panic, never a response with both framings, and a
    /// complete length-framed body is exactly its length.
    #[test]
    fn random_responses_keep_the_invariants() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let mut input = Vec::new();
            for _ in 0..rng.below(12) {
                input.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
            for _ in 0..rng.below(4) {
                if input.is_empty() {
                    break;
                }
                let at = rng.below(input.len());
                match rng.below(3) {
                    0 => input[at] = rng.next() as u8,
                    1 => {
                        input.remove(at);
                    }
                    _ => input.truncate(at),
                }
            }
            let head_request = rng.below(8) == 0;
            let limit = if rng.below(4) == 0 {
                64
            } else {
                DEFAULT_HEAD_LIMIT
            };
            check_invariants(&input, head_request, limit);
        }
    }

    fn check_invariants(input: &[u8], head_request: bool, limit: usize) {
        let Ok(Some(parsed)) = parse_response(input, head_request, limit) else {
            return;
        };
        let headers = &parsed.head.headers;
        assert!(
            !(headers.contains_key(header::TRANSFER_ENCODING)
                && headers.contains_key(header::CONTENT_LENGTH)),
            "accepted both framings: {input:?}"
        );
        assert!(parsed.body.len() + parsed.rest <= input.len());
        match parsed.head.framing {
            Framing::Length(length) if parsed.complete => {
                assert_eq!(parsed.body.len() as u64, length, "{input:?}")
            }
            Framing::Length(length) => assert!((parsed.body.len() as u64) < length),
            Framing::Empty => assert!(parsed.body.is_empty()),
            Framing::Close => assert!(!parsed.head.keep_alive && parsed.rest == 0),
            Framing::Chunked => {}
        }
    }
}
