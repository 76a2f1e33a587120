//! Partitions of the event subjects, for discovery past one process.
//!
//! A NATS server (or account) mapping puts every event of a service into one
//! of `N` partitions by its service token, `{{partition(N,1)}}` (the shipped
//! `nats/cluster/partitions.conf`): `<prefix>.register.web.a` arrives as
//! `<prefix>.partition.<p>.register.web.a`. The server computes `p` as the
//! FNV-1a 32-bit hash of the token's bytes modulo `N`
//! (nats-server `server/subject_transform.go`, `getHashPartition`);
//! [`partition_of`] computes the same, so that discovery can tell which
//! stored services are a partition's and refuse an event the server put in
//! a partition its service does not hash to (the server's `N` and discovery's
//! differ).
//!
//! `rollcall discovery --partitions 0-7/16` runs one fenced writer per owned
//! partition ([`Partitions`]); a standby is another process owning the same
//! ones.

use std::fmt;
use std::str::FromStr;

/// The most partitions a mapping may have here: each owned partition is a
/// writer with its own subscriptions, fence and heartbeat; past a few hundred
/// per process the fixed cost of each outweighs the spreading.
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition nats-server's `{{partition(count, <token>)}}` puts `token`
/// in: FNV-1a 32-bit over its bytes, modulo `count` (0 when `count` is 0, as
/// the server does).
pub fn partition_of(token: &str, count: u32) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    if count == 0 {
        return 0;
    }
    let hash = token.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    });
    hash % count
}

/// One partition of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    index: u32,
    count: u32,
}

impl Partition {
    /// Partition `index` of `count` (`index < count <= MAX_PARTITIONS`).
    pub fn new(index: u32, count: u32) -> Result<Partition, PartitionsError> {
        check_count(count)?;
        if index >= count {
            return Err(PartitionsError::OutOfRange { index, count });
        }
        Ok(Partition { index, count })
    }

    pub fn index(self) -> u32 {
        self.index
    }

    pub fn count(self) -> u32 {
        self.count
    }

    /// Whether `service`'s events are mapped into this partition.
    pub fn owns(self, service: &str) -> bool {
        partition_of(service, self.count) == self.index
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Why a `--partitions` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionsError {
    #[error("{text:?} has no `/N`: write the partitions, then `/` and how many the server's mapping has, e.g. `0-7/16`")]
    MissingCount { text: String },
    #[error("{text:?} is not a number of partitions: `/N` takes a whole number from 1 to {MAX_PARTITIONS}")]
    BadCount { text: String },
    #[error("{count} partitions: the mapping's N is 1 to {MAX_PARTITIONS}")]
    CountOutOfRange { count: u32 },
    #[error("no partition listed before `/`: write e.g. `0-7/16` or `0,3,5/16`")]
    Empty,
    #[error("{item:?} is not a partition or a range of them (`3` or `0-7`)")]
    BadItem { item: String },
    #[error("range {item:?} runs backwards: write the lower partition first")]
    Backwards { item: String },
    #[error("partition {index} does not exist in {count}: they are 0 to {}", count.saturating_sub(1))]
    OutOfRange { index: u32, count: u32 },
    #[error("partition {index} is listed twice")]
    Twice { index: u32 },
}

fn check_count(count: u32) -> Result<(), PartitionsError> {
    if count == 0 || count > MAX_PARTITIONS {
        return Err(PartitionsError::CountOutOfRange { count });
    }
    Ok(())
}

/// The partitions one discovery process owns, out of `count`: `0-7/16`,
/// `0-3,8,9/16`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// Ascending, each once.
    indexes: Vec<u32>,
    count: u32,
}

impl Partitions {
    /// How many partitions the mapping has.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The owned partitions, ascending.
    pub fn iter(&self) -> impl Iterator<Item = Partition> + '_ {
        self.indexes.iter().map(|&index| Partition {
            index,
            count: self.count,
        })
    }
}

impl FromStr for Partitions {
    type Err = PartitionsError;

    fn from_str(text: &str) -> Result<Partitions, PartitionsError> {
        let (list, count_text) =
            text.rsplit_once('/')
                .ok_or_else(|| PartitionsError::MissingCount {
                    text: text.to_owned(),
                })?;
        let count: u32 = count_text
            .trim()
            .parse()
            .map_err(|_| PartitionsError::BadCount {
                text: count_text.to_owned(),
            })?;
        check_count(count)?;
        if list.trim().is_empty() {
            return Err(PartitionsError::Empty);
        }
        let mut indexes = Vec::new();
        for item in list.split(',') {
            let (first, last) = parse_item(item.trim())?;
            for index in first..=last {
                Partition::new(index, count)?;
                if indexes.contains(&index) {
                    return Err(PartitionsError::Twice { index });
                }
                indexes.push(index);
            }
        }
        indexes.sort_unstable();
        Ok(Partitions { indexes, count })
    }
}

/// `3` or `0-7`, as the first and last partition.
fn parse_item(item: &str) -> Result<(u32, u32), PartitionsError> {
    let bad = || PartitionsError::BadItem {
        item: item.to_owned(),
    };
    let number = |text: &str| text.trim().parse::<u32>().map_err(|_| bad());
    let (first, last) = match item.split_once('-') {
        Some((first, last)) => (number(first)?, number(last)?),
        None => {
            let index = number(item)?;
            (index, index)
        }
    };
    if first > last {
        return Err(PartitionsError::Backwards {
            item: item.to_owned(),
        });
    }
    Ok((first, last))
}

impl fmt::Display for Partitions {
    /// The shortest form that parses back: `0-7/16`, `0-3,8,9/16`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &index in &self.indexes {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == index => *last = index,
                _ => runs.push((index, index)),
            }
        }
        let items: Vec<String> = runs
            .iter()
            .map(|&(first, last)| match last - first {
                0 => first.to_string(),
                1 => format!("{first},{last}"),
                _ => format!("{first}-{last}"),
            })
            .collect();
        write!(f, "{}/{}", items.join(","), self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_32_modulo_the_count() {
        // The published FNV-1a 32 test vectors of "", "a" and "foobar".
        assert_eq!(partition_of("", 1000), 0x811c_9dc5 % 1000);
        assert_eq!(partition_of("a", 1000), 0xe40c_292c % 1000);
        assert_eq!(partition_of("foobar", 1000), 0xbf9c_f968 % 1000);
        assert_eq!(partition_of("web", 1), 0);
        assert_eq!(partition_of("web", 0), 0, "as the server: no division by 0");
        for service in ["web", "api", "billing"] {
            assert!(partition_of(service, 16) < 16);
            let p = Partition::new(partition_of(service, 16), 16).unwrap();
            assert!(p.owns(service));
        }
    }

    #[test]
    fn ranges_and_lists_parse_and_print_back() {
        for (text, indexes, shown) in [
            ("0-7/16", vec![0, 1, 2, 3, 4, 5, 6, 7], "0-7/16"),
            ("0-3,8,9/16", vec![0, 1, 2, 3, 8, 9], "0-3,8,9/16"),
            ("15/16", vec![15], "15/16"),
            (" 9 , 2-3 /16", vec![2, 3, 9], "2,3,9/16"),
            ("0/1", vec![0], "0/1"),
        ] {
            let parsed: Partitions = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            let got: Vec<u32> = parsed.iter().map(Partition::index).collect();
            assert_eq!(got, indexes, "{text}");
            assert_eq!(parsed.count(), if text == "0/1" { 1 } else { 16 });
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(shown.parse::<Partitions>(), Ok(parsed));
        }
    }

    #[test]
    fn every_bad_value_is_refused_naming_what_is_wrong() {
        for (text, error, says) in [
            (
                "0-7",
                PartitionsError::MissingCount { text: "0-7".into() },
                "no `/N`",
            ),
            (
                "0-7/",
                PartitionsError::BadCount { text: "".into() },
                "not a number of partitions",
            ),
            (
                "0/x",
                PartitionsError::BadCount { text: "x".into() },
                "\"x\"",
            ),
            (
                "0/0",
                PartitionsError::CountOutOfRange { count: 0 },
                "0 partitions",
            ),
            (
                "0/5000",
                PartitionsError::CountOutOfRange { count: 5000 },
                "1 to 1024",
            ),
            ("/16", PartitionsError::Empty, "no partition listed"),
            (
                "0-16/16",
                PartitionsError::OutOfRange {
                    index: 16,
                    count: 16,
                },
                "0 to 15",
            ),
            (
                "16/16",
                PartitionsError::OutOfRange {
                    index: 16,
                    count: 16,
                },
                "does not exist",
            ),
            (
                "7-3/16",
                PartitionsError::Backwards { item: "7-3".into() },
                "backwards",
            ),
            (
                "0,,1/16",
                PartitionsError::BadItem { item: "".into() },
                "not a partition",
            ),
            (
                "a-b/16",
                PartitionsError::BadItem { item: "a-b".into() },
                "\"a-b\"",
            ),
            (
                "-1/16",
                PartitionsError::BadItem { item: "-1".into() },
                "\"-1\"",
            ),
            (
                "0-3,2/16",
                PartitionsError::Twice { index: 2 },
                "listed twice",
            ),
        ] {
            let refused = text.parse::<Partitions>();
            assert_eq!(refused.as_ref().err(), Some(&error), "{text}");
            let message = error.to_string();
            assert!(message.contains(says), "{text}: {message}");
        }
    }
}
