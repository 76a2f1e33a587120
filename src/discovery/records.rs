//! What a new leader writes on takeover: the stored records grouped per
//! service, assembled into the snapshots the fold adopts, and compared with
//! the folded catalog record by record. Pure: no NATS, no clock.

use std::collections::{BTreeMap, BTreeSet};

use crate::catalog::Catalog;
use crate::protocol::{Left, Presence, Record, Snapshot};

/// Stored records by service, then by instance id.
pub(super) type ByService = BTreeMap<String, BTreeMap<String, Record>>;

pub(super) fn by_service(records: Vec<Record>) -> ByService {
    let mut grouped = ByService::new();
    for record in records {
        grouped
            .entry(record.service.clone())
            .or_default()
            .insert(record.id.clone(), record);
    }
    grouped
}

/// The live records of one service as a snapshot; its revision the highest
/// of all its records (tombstones count).
pub(super) fn snapshot(service: &str, records: &BTreeMap<String, Record>) -> Snapshot {
    Snapshot {
        service: service.to_owned(),
        revision: records.values().map(|r| r.revision).max().unwrap_or(0),
        instances: records
            .values()
            .filter_map(|r| r.instance().cloned())
            .collect(),
    }
}

/// The instances whose record must be written for the stream to say what
/// `catalog` holds: a live instance stored differently or not at all, and a
/// stored live instance that is not live here (a tombstone, for which the
/// reason is given; the stream never said it left, so `deregistered`).
pub(super) fn differences(catalog: &Catalog, stored: &ByService) -> Vec<(String, String, Left)> {
    let mut differ = Vec::new();
    let mut services: BTreeSet<String> = stored.keys().cloned().collect();
    services.extend(catalog.snapshots().into_iter().map(|s| s.service));
    let none = BTreeMap::new();
    for service in services {
        let records = stored.get(&service).unwrap_or(&none);
        let own = catalog
            .snapshot(&service)
            .map(|s| s.instances)
            .unwrap_or_default();
        let own_ids: BTreeSet<&str> = own.iter().map(|i| i.id.as_str()).collect();
        for instance in &own {
            let same = records
                .get(&instance.id)
                .is_some_and(|r| r.presence == Presence::Live(instance.clone()));
            if !same {
                differ.push((service.clone(), instance.id.clone(), Left::Deregistered));
            }
        }
        for record in records.values() {
            if record.instance().is_some() && !own_ids.contains(record.id.as_str()) {
                differ.push((service.clone(), record.id.clone(), Left::Deregistered));
            }
        }
    }
    differ
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::protocol::{Event, Instance};

    fn live(id: &str, port: u16, revision: u64) -> Record {
        Record {
            service: "web".into(),
            id: id.into(),
            revision,
            presence: Presence::Live(Instance::new("web", id, "127.0.0.1", port)),
        }
    }

    #[test]
    fn a_takeover_writes_only_what_differs_and_tombstones_what_left() {
        let now = Instant::now();
        let mut catalog = Catalog::new();
        for (id, port) in [("a", 1), ("b", 2), ("c", 3)] {
            catalog.apply(
                Event::Register(Instance::new("web", id, "127.0.0.1", port)),
                now,
            );
        }
        // c left while this replica followed; the stored record says live.
        catalog.apply(
            Event::Deregister {
                service: "web".into(),
                id: "c".into(),
            },
            now + Duration::from_millis(1),
        );
        let gone = Record {
            presence: Presence::Left(Left::Expired),
            ..live("d", 4, 3)
        };
        let stored = by_service(vec![
            live("a", 1, 1),
            live("b", 9, 2),
            live("c", 3, 3),
            gone,
        ]);
        let adopted = snapshot("web", &stored["web"]);
        assert_eq!(adopted.revision, 3);
        assert_eq!(adopted.instances.len(), 3, "tombstones list no instance");
        catalog.adopt_unknown(&adopted, now + Duration::from_millis(2));
        let mut differ = differences(&catalog, &stored);
        differ.sort();
        assert_eq!(
            differ,
            [
                ("web".into(), "b".into(), Left::Deregistered),
                ("web".into(), "c".into(), Left::Deregistered),
            ],
            "a is stored as it is; b's address differs; c left"
        );
    }
}
