//! One live instance's own record as the catalog holds it: the numbers the
//! fold reads, and every string (address, tags, meta) packed in one
//! allocation. Service and id are not in it: the catalog's maps hold them
//! once, as keys.
//!
//! A record held as an [`Instance`] costs about 13 allocations and, with
//! the meta map's B-tree node, over a kilobyte; packed it is one allocation
//! of about its strings' length.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::Instance;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    ttl_ms: u64,
    weight: u32,
    port: u16,
    /// The number of tags and of meta pairs, then the address, each tag,
    /// each meta key and value in key order, every string after its length
    /// (LEB128).
    text: Box<[u8]>,
}

/// Appends `n` as LEB128: 7 bits a byte, low first, the high bit saying
/// that more follow.
fn push_len(text: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        text.push((n as u8) | 0x80);
        n >>= 7;
    }
    text.push(n as u8);
}

/// The bytes [`push_len`] takes for `n`.
fn len_of_len(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits.max(1) as usize).div_ceil(7)
}

/// Reads back what [`Record::new`] packed, in order.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn len(&mut self) -> usize {
        let mut n = 0;
        let mut shift = 0;
        while let Some((&byte, rest)) = self.rest.split_first() {
            self.rest = rest;
            n |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        n
    }

    fn bytes(&mut self) -> &'a [u8] {
        let len = self.len().min(self.rest.len());
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        bytes
    }

    /// The next string; packed from a `String`, so always UTF-8.
    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// Every string of `instance`'s record, in packing order.
fn strings(instance: &Instance) -> impl Iterator<Item = &str> {
    std::iter::once(instance.address.as_str())
        .chain(instance.tags.iter().map(String::as_str))
        .chain(
            instance
                .meta
                .iter()
                .flat_map(|(key, value)| [key.as_str(), value.as_str()]),
        )
}

impl Record {
    /// `instance`'s own record; an `operator` block is not part of it (no
    /// event may carry one).
    pub(super) fn new(instance: &Instance) -> Record {
        let (tags, pairs) = (instance.tags.len(), instance.meta.len());
        let size = len_of_len(tags)
            + len_of_len(pairs)
            + strings(instance)
                .map(|s| len_of_len(s.len()) + s.len())
                .sum::<usize>();
        let mut text = Vec::with_capacity(size);
        push_len(&mut text, tags);
        push_len(&mut text, pairs);
        for s in strings(instance) {
            push_len(&mut text, s.len());
            text.extend_from_slice(s.as_bytes());
        }
        Record {
            ttl_ms: instance.ttl_ms,
            weight: instance.weight,
            port: instance.port,
            text: text.into_boxed_slice(),
        }
    }

    /// Whether `instance` announces this record (its service and id aside).
    pub(super) fn matches(&self, instance: &Instance) -> bool {
        if (self.ttl_ms, self.weight, self.port)
            != (instance.ttl_ms, instance.weight, instance.port)
            || instance.operator.is_some()
        {
            return false;
        }
        let mut fields = Fields { rest: &self.text };
        if (fields.len(), fields.len()) != (instance.tags.len(), instance.meta.len()) {
            return false;
        }
        strings(instance).all(|s| fields.bytes() == s.as_bytes())
    }

    /// The record as an [`Instance`] of `service`.
    pub(super) fn instance(&self, service: &str, id: &str) -> Instance {
        let mut fields = Fields { rest: &self.text };
        let (tags, pairs) = (fields.len(), fields.len());
        let mut instance = Instance::new(service, id, fields.string(), self.port);
        instance.ttl_ms = self.ttl_ms;
        instance.weight = self.weight;
        instance.tags = (0..tags).map(|_| fields.string()).collect();
        instance.meta = (0..pairs)
            .map(|_| (fields.string(), fields.string()))
            .collect::<BTreeMap<_, _>>();
        instance
    }

    /// `address:port`, as [`Instance::authority`] gives it, without
    /// unpacking the rest.
    pub(super) fn authority(&self) -> String {
        let mut fields = Fields { rest: &self.text };
        // Past the counts of tags and pairs.
        fields.len();
        fields.len();
        let address = String::from_utf8_lossy(fields.bytes());
        if address.contains(':') {
            format!("[{address}]:{}", self.port)
        } else {
            format!("{address}:{}", self.port)
        }
    }

    pub(super) fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rich() -> Instance {
        let mut instance = Instance::new("web", "a", "fe80::1", 8443);
        instance.ttl_ms = 600_000;
        instance.weight = 10_000;
        instance.tags = vec!["v2".into(), String::new(), "ünïcode".into()];
        instance.meta.insert("zone".into(), "eu-west-1a".into());
        instance.meta.insert("long".into(), "x".repeat(300));
        instance.meta.insert(String::new(), "empty key".into());
        instance
    }

    #[test]
    fn a_record_gives_back_the_instance_it_was_made_of() {
        for instance in [rich(), Instance::new("web", "b", "10.0.0.1", 80)] {
            let record = Record::new(&instance);
            assert_eq!(record.instance(&instance.service, &instance.id), instance);
            assert!(record.matches(&instance));
            assert_eq!(record.ttl(), instance.ttl());
            assert_eq!(record.authority(), instance.authority());
        }
    }

    #[test]
    fn a_record_matches_no_instance_that_differs_in_anything() {
        let record = Record::new(&rich());
        type Edit = Box<dyn Fn(&mut Instance)>;
        let mut changes: Vec<Edit> = vec![
            Box::new(|i| i.address.push('2')),
            Box::new(|i| i.port += 1),
            Box::new(|i| i.ttl_ms += 1),
            Box::new(|i| i.weight -= 1),
            Box::new(|i| drop(i.tags.pop())),
            Box::new(|i| i.tags[0].push('x')),
            Box::new(|i| i.tags.swap(0, 2)),
            Box::new(|i| drop(i.meta.insert("zone".into(), "eu-west-1b".into()))),
            Box::new(|i| drop(i.meta.insert("zonf".into(), "eu-west-1a".into()))),
            Box::new(|i| drop(i.meta.remove(""))),
            // A tag moved into the meta map is not the same record.
            Box::new(|i| {
                i.tags.pop();
                i.meta.insert("ünïcode".into(), String::new());
            }),
        ];
        changes.push(Box::new(|i| {
            i.operator = Some(crate::protocol::Operator {
                drain: true,
                weight: None,
                own_weight: 1,
                by: "alice".into(),
                at_ms: 1,
            })
        }));
        for (n, change) in changes.iter().enumerate() {
            let mut other = rich();
            change(&mut other);
            assert!(!record.matches(&other), "change {n}");
        }
    }

    #[test]
    fn lengths_take_as_many_bytes_as_they_need() {
        for n in [0, 1, 127, 128, 16_383, 16_384, usize::MAX] {
            let mut text = Vec::new();
            push_len(&mut text, n);
            assert_eq!(text.len(), len_of_len(n), "{n}");
            assert_eq!(Fields { rest: &text }.len(), n);
        }
    }
}
