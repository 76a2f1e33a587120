//! An instance's response as arbitrary bytes: parsing its head and framing
//! its body must never panic, never accept both framings, and a complete
//! length-framed body is exactly its length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rollcall::balancer::h1::{parse_response, Framing, DEFAULT_HEAD_LIMIT};

fuzz_target!(|input: &[u8]| {
    // The first byte picks the request's method and the head limit.
    let Some((&choice, input)) = input.split_first() else {
        return;
    };
    let head_request = choice & 1 == 1;
    let limit = if choice & 2 == 2 {
        64
    } else {
        DEFAULT_HEAD_LIMIT
    };
    let Ok(Some(parsed)) = parse_response(input, head_request, limit) else {
        return;
    };
    let headers = &parsed.head.headers;
    assert!(!(headers.contains_key("transfer-encoding") && headers.contains_key("content-length")));
    assert!(parsed.body.len() + parsed.rest <= input.len());
    match parsed.head.framing {
        Framing::Length(length) if parsed.complete => assert_eq!(parsed.body.len() as u64, length),
        Framing::Length(length) => assert!((parsed.body.len() as u64) < length),
        Framing::Empty => assert!(parsed.body.is_empty()),
        Framing::Close => assert!(!parsed.head.keep_alive && parsed.rest == 0),
        Framing::Chunked => {}
    }
});
