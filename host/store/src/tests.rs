use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    (dir, store)
}

fn scan(tx: &Tx, map: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lower = Bound::Unbounded;
    while let Some((k, v)) = tx.first_in(map, lower.as_ref().map(Vec::as_slice), Bound::Unbounded).unwrap() {
        lower = Bound::Excluded(k.clone());
        out.push((k, v));
    }
    out
}

#[test]
fn an_unapplied_transaction_writes_nothing() {
    let (_d, s) = store();
    let mut tx = s.begin().unwrap();
    tx.put("m", b"k", b"v");
    assert_eq!(tx.get("m", b"k").unwrap().as_deref(), Some(&b"v"[..]));
    drop(tx);
    assert_eq!(s.begin().unwrap().get("m", b"k").unwrap(), None);
}

#[test]
fn applied_write_sets_are_visible_to_later_transactions_only() {
    let (_d, s) = store();
    let before = s.begin().unwrap();
    let mut tx = s.begin().unwrap();
    tx.put("m", b"a", b"1");
    tx.put("m", b"b", b"2");
    s.apply(&tx.into_writes()).unwrap();
    assert_eq!(before.get("m", b"a").unwrap(), None, "a snapshot never changes");
    let after = s.begin().unwrap();
    assert_eq!(scan(&after, "m").len(), 2);
    let mut rm = s.begin().unwrap();
    assert!(rm.remove("m", b"a").unwrap());
    assert!(!rm.remove("m", b"zz").unwrap());
    s.apply(&rm.into_writes()).unwrap();
    assert_eq!(scan(&s.begin().unwrap(), "m"), vec![(b"b".to_vec(), b"2".to_vec())]);
}

#[test]
fn two_apps_maps_are_isolated() {
    let (_d, s) = store();
    let (a, b) = (app_map("alpha", "records"), app_map("beta", "records"));
    let mut tx = s.begin().unwrap();
    tx.put(&a, b"k", b"alpha's");
    s.apply(&tx.into_writes()).unwrap();
    let tx = s.begin().unwrap();
    assert_eq!(tx.get(&b, b"k").unwrap(), None);
    assert!(scan(&tx, &b).is_empty());
    assert_eq!(scan(&tx, &a).len(), 1);
    // A map whose name extends another's never leaks into its scans.
    let mut tx = s.begin().unwrap();
    tx.put("alpha/records2", b"k", b"x");
    tx.put("alpha/record", b"k", b"x");
    s.apply(&tx.into_writes()).unwrap();
    assert_eq!(scan(&s.begin().unwrap(), &a).len(), 1);
}

#[test]
fn public_maps_are_named_by_prefix() {
    assert!(is_public(&app_map("app", "public:stats")));
    assert!(is_public("gov.members"));
    assert!(is_public(&app_map("app", "gov.app_config")));
    assert!(!is_public(&app_map("app", "records")));
    assert!(!is_public(&app_map("app", "records.public:x")));
}

#[test]
fn scans_run_in_key_order_across_layers_with_removals() {
    let (_d, s) = store();
    let mut tx = s.begin().unwrap();
    for k in [b"b", b"d", b"f", b"h"] {
        tx.put("m", k, b"base");
    }
    s.apply(&tx.into_writes()).unwrap();
    let mut pending = WriteSet::default();
    pending.put("m", b"c", b"pending");
    pending.remove("m", b"d");
    let mut stack = PendingWrites::default();
    stack.push(Arc::new(pending));
    let mut tx = s.begin_over(&stack).unwrap();
    tx.put("m", b"a", b"own");
    tx.put("m", b"d", b"own");
    tx.remove("m", b"f").unwrap();
    let keys: Vec<_> = scan(&tx, "m")
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
        .collect();
    assert_eq!(
        keys,
        [("a", "own"), ("b", "base"), ("c", "pending"), ("d", "own"), ("h", "base")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    let bounded = tx.first_in("m", Bound::Excluded(b"d"), Bound::Excluded(b"h")).unwrap();
    assert_eq!(bounded, None, "f was removed and h is excluded");
}

/// Bounds that hold no key find nothing, whichever layer holds entries of the map: a contract
/// may scan with any bounds, and `BTreeMap::range` panics on some of these.
#[test]
fn a_scan_with_bounds_that_hold_no_key_finds_nothing() {
    let (a, b): (&[u8], &[u8]) = (b"a", b"b");
    let empty = [
        (Bound::Included(b), Bound::Excluded(a)),
        (Bound::Excluded(a), Bound::Excluded(a)),
        (Bound::Included(a), Bound::Excluded(a)),
        (Bound::Excluded(a), Bound::Included(a)),
        (Bound::Included(b), Bound::Included(a)),
    ];
    let dir = tempfile::tempdir().unwrap();
    for s in [store().1, sealed_store(&dir, [5; 32])] {
        let mut tx = s.begin().unwrap();
        tx.put("m", b"a", b"base");
        s.apply(&tx.into_writes()).unwrap();
        let mut stack = PendingWrites::default();
        stack.push(pending(&[(b"a", Some(b"pending"))]));
        let mut tx = s.begin_over(&stack).unwrap();
        tx.put("m", b"x", b"1");
        for (lower, upper) in empty {
            assert_eq!(tx.first_in("m", lower, upper).unwrap(), None, "{lower:?}..{upper:?}");
        }
        let one = tx.first_in("m", Bound::Included(a), Bound::Included(a)).unwrap();
        assert_eq!(one, Some((b"a".to_vec(), b"pending".to_vec())), "a range of one key still finds it");
    }
}

/// The bytes of a write set whose one entry is under `full`, as a write set serializes.
fn encoded_with_key(full: &[u8]) -> Vec<u8> {
    let mut entries = BTreeMap::new();
    entries.insert(full.to_vec(), Some(b"v".to_vec()));
    postcard::to_allocvec(&WriteSet { entries }).unwrap()
}

/// Every node splits a write set's keys into map and key as it applies it: one that is not a
/// table key is refused as it decodes, not a panic later.
#[test]
fn a_write_set_whose_keys_are_not_table_keys_does_not_decode() {
    let mut valid = WriteSet::default();
    valid.put("m", b"k", b"v");
    valid.remove("gov.members", b"");
    let decoded: WriteSet = postcard::from_bytes(&postcard::to_allocvec(&valid).unwrap()).unwrap();
    assert_eq!(decoded, valid);

    assert!(postcard::from_bytes::<WriteSet>(&encoded_with_key(b"nosep")).is_err());
    assert!(postcard::from_bytes::<WriteSet>(&encoded_with_key(b"\xff\xfe\0k")).is_err());
    // postcard drops a custom error's message; this is the message other formats carry.
    assert_eq!(table_key_fault(b"nosep"), Some("no 0x00 separates its map name from its key"));
    assert_eq!(table_key_fault(b"\xff\xfe\0k"), Some("its map name is not UTF-8"));
    assert_eq!(table_key_fault(b"m\0"), None);
}

fn pending(writes: &[(&[u8], Option<&[u8]>)]) -> Arc<WriteSet> {
    let mut set = WriteSet::default();
    for (k, v) in writes {
        match v {
            Some(v) => set.put("m", k, v),
            None => set.remove("m", k),
        }
    }
    Arc::new(set)
}

fn read(tx: &Tx, key: &[u8]) -> Option<String> {
    tx.get("m", key).unwrap().map(|v| String::from_utf8(v).unwrap())
}

#[test]
fn the_newest_pending_write_wins_and_dropping_applied_sets_keeps_newer_ones() {
    let (_d, s) = store();
    let mut tx = s.begin().unwrap();
    tx.put("m", b"a", b"base");
    tx.put("m", b"b", b"base");
    s.apply(&tx.into_writes()).unwrap();
    let mut stack = PendingWrites::default();
    let first = pending(&[(b"a", Some(b"1")), (b"b", None), (b"c", Some(b"1"))]);
    stack.push(first.clone());
    stack.push(pending(&[(b"a", Some(b"2"))]));
    stack.push(pending(&[(b"b", Some(b"3")), (b"c", None)]));
    let tx = s.begin_over(&stack).unwrap();
    assert_eq!([read(&tx, b"a"), read(&tx, b"b"), read(&tx, b"c")], [Some("2".into()), Some("3".into()), None]);
    assert_eq!(scan(&tx, "m").len(), 2, "c is removed by the newest set");

    // The oldest set is applied: a snapshot from now on holds it, and the stack forgets it
    // except where nothing newer wrote.
    s.apply(&first).unwrap();
    stack.drop_oldest(1);
    assert_eq!(stack.len(), 2);
    let later = s.begin_over(&stack).unwrap();
    assert_eq!(
        [read(&later, b"a"), read(&later, b"b"), read(&later, b"c")],
        [Some("2".into()), Some("3".into()), None]
    );
    // A transaction that began earlier keeps the stack as it stood.
    assert_eq!(read(&tx, b"a"), Some("2".into()));

    stack.drop_oldest(5);
    assert!(stack.is_empty());
    assert_eq!(read(&s.begin_over(&stack).unwrap(), b"a"), Some("1".into()), "only applied writes are left");
    stack.push(pending(&[(b"z", Some(b"4"))]));
    stack.clear();
    assert_eq!(read(&s.begin_over(&stack).unwrap(), b"z"), None);
}

fn sealed_store(dir: &tempfile::TempDir, secret: [u8; 32]) -> Store {
    Store::open_sealed(&dir.path().join("state.redb"), Arc::new(Sealer::new(&secret))).unwrap()
}

/// Random operations against a model: every read and every scan agrees with a BTreeMap, in a
/// plain store and in a sealed one (where scans go through the in-memory key index).
#[test]
fn matches_a_model_under_random_operations() {
    let (_d, s) = store();
    matches_a_model(&s);
    let dir = tempfile::tempdir().unwrap();
    matches_a_model(&sealed_store(&dir, [3; 32]));
    // Reopened, the map's first scan reads its keys back from the sealed entries alone.
    let before = scan(&sealed_store(&dir, [3; 32]).begin().unwrap(), "m");
    assert!(!before.is_empty());
}

fn matches_a_model(s: &Store) {
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..40 {
        let mut tx = s.begin().unwrap();
        let mut staged = model.clone();
        for _ in 0..25 {
            let key = vec![b'a' + next(12) as u8, next(3) as u8];
            if next(3) == 0 {
                tx.remove("m", &key).unwrap();
                staged.remove(&key);
            } else {
                let value = format!("{round}-{}", next(1000)).into_bytes();
                tx.put("m", &key, &value);
                staged.insert(key, value);
            }
        }
        let expected: Vec<_> = staged.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(scan(&tx, "m"), expected, "round {round}");
        if next(4) != 0 {
            s.apply(&tx.into_writes()).unwrap();
            model = staged;
        }
        let committed: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(scan(&s.begin().unwrap(), "m"), committed, "round {round}");
    }
}

#[test]
fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let s = Store::open(&path).unwrap();
        let mut tx = s.begin().unwrap();
        tx.put("m", b"k", b"v");
        s.apply(&tx.into_writes()).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.begin().unwrap().get("m", b"k").unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-db");
    std::fs::write(&path, b"garbage that is not a redb file at all, certainly").unwrap();
    let err = Store::open(&path).err().expect("garbage is refused");
    assert!(err.to_string().contains("not-a-db"), "{err}");
}

/// What a reader of a sealed store's file learns of a private map: not its keys, not its
/// values, and not which keys two maps share.
#[test]
fn a_sealed_store_keeps_no_private_key_or_value_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let s = sealed_store(&dir, [9; 32]);
    let (private, public) = (app_map("app", "records"), app_map("app", "public:totals"));
    let mut tx = s.begin().unwrap();
    for n in 0..50 {
        tx.put(&private, format!("PARTYKEY{n:03}").as_bytes(), format!("SECRETVALUE{n:03}").as_bytes());
    }
    tx.put(&public, b"PUBLICKEY", b"PUBLICVALUE");
    s.apply(&tx.into_writes()).unwrap();
    let mut tx = s.begin().unwrap();
    tx.remove(&private, b"PARTYKEY007").unwrap();
    s.apply(&tx.into_writes()).unwrap();
    drop(s);

    let bytes = std::fs::read(dir.path().join("state.redb")).unwrap();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for n in [0, 7, 25, 49] {
        assert!(!contains(format!("PARTYKEY{n:03}").as_bytes()), "key {n} is in clear");
        assert!(!contains(format!("SECRETVALUE{n:03}").as_bytes()), "value {n} is in clear");
    }
    assert!(contains(b"PUBLICKEY") && contains(b"PUBLICVALUE"), "public maps stay readable");

    let s = sealed_store(&dir, [9; 32]);
    let tx = s.begin().unwrap();
    let keys: Vec<_> = scan(&tx, &private).into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect();
    let expected: Vec<_> = (0..50).filter(|n| *n != 7).map(|n| format!("PARTYKEY{n:03}")).collect();
    assert_eq!(keys, expected, "reopened, scans still run in key order");
    assert_eq!(tx.get(&private, b"PARTYKEY025").unwrap().as_deref(), Some(&b"SECRETVALUE025"[..]));
    drop((tx, s));
    let err = Store::open_sealed(&dir.path().join("state.redb"), Arc::new(Sealer::new(&[8; 32]))).err();
    assert!(err.expect("another secret cannot rebuild the index").to_string().contains("does not open"));
}

/// A store written before keys were hidden (private entries under their own keys) is converted
/// when it opens sealed, once, losing nothing.
#[test]
fn an_older_sealed_store_is_converted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let sealer = Sealer::new(&[5; 32]);
    {
        let plain = Store::open(&path).unwrap();
        let mut batch = plain.write_batch().unwrap();
        for n in 0..10u8 {
            let full = full_key("app/m", &[b'k', n]);
            batch.insert_stored(&full, &sealer.seal(Purpose::StateValue, &full, &[b'v', n])).unwrap();
        }
        batch.commit().unwrap();
    }
    let s = Store::open_sealed(&path, Arc::new(Sealer::new(&[5; 32]))).unwrap();
    let got = scan(&s.begin().unwrap(), "app/m");
    assert_eq!(got, (0..10u8).map(|n| (vec![b'k', n], vec![b'v', n])).collect::<Vec<_>>());
    assert_eq!(s.meta(KEY_DIGESTS_META).unwrap().as_deref(), Some(&b"1"[..]));
    drop(s);
    // The old entries' pages may linger in the file until redb reuses them; what the table
    // holds now is digests only.
    let s = Store::open(&path).unwrap();
    let mut table_keys = Vec::new();
    s.export()
        .unwrap()
        .for_each(|k, _| {
            table_keys.push(k.to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(table_keys.len(), 10);
    assert!(table_keys.iter().all(|k| k.len() == "app/m".len() + 1 + 32), "{table_keys:?}");
}

/// Entries moved between two nodes' stores of one service (a snapshot) arrive hidden and
/// indexed; an entry moved under another key's digest is refused (the seal is bound to it).
#[test]
fn stored_entries_move_between_stores_of_one_service() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (from, to) = (sealed_store(&a, [4; 32]), sealed_store(&b, [4; 32]));
    let mut tx = from.begin().unwrap();
    for k in ["b", "a", "c"] {
        tx.put("app/m", k.as_bytes(), k.repeat(3).as_bytes());
    }
    from.apply(&tx.into_writes()).unwrap();
    let mut entries = Vec::new();
    from.export()
        .unwrap()
        .for_each(|k, v| {
            entries.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    let mut batch = to.write_batch().unwrap();
    batch.clear().unwrap();
    for (k, v) in &entries {
        batch.insert_stored(k, v).unwrap();
    }
    batch.commit().unwrap();
    let got: Vec<_> = scan(&to.begin().unwrap(), "app/m").into_iter().map(|(k, _)| k).collect();
    assert_eq!(got, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);

    let hidden: Vec<_> = entries.iter().filter(|(k, _)| map_of(k) == "app/m").collect();
    let mut batch = to.write_batch().unwrap();
    let err = batch.insert_stored(&hidden[0].0, &hidden[1].1).unwrap_err();
    assert!(err.to_string().contains("does not open"), "{err}");
    // A key that does not split into map and key is refused, not split.
    let err = batch.insert_stored(b"no separator", b"v").unwrap_err();
    assert!(err.to_string().contains("not a table key"), "{err}");
}

/// Readers never see a scan that disagrees with their snapshot while commits move keys: every
/// commit replaces the map's one key with the next, so every scan finds exactly one.
#[test]
fn scans_match_their_snapshot_while_commits_run() {
    let dir = tempfile::tempdir().unwrap();
    let s = sealed_store(&dir, [6; 32]);
    let mut tx = s.begin().unwrap();
    tx.put("app/m", &0u32.to_be_bytes(), b"v");
    s.apply(&tx.into_writes()).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let mut scans = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let found = scan(&s.begin().unwrap(), "app/m");
                    assert_eq!(found.len(), 1, "a scan found {found:?}");
                    scans += 1;
                }
                scans
            })
        })
        .collect();
    for n in 0..300u32 {
        // Keys move both ways in order, so an index older or newer than the snapshot would show.
        let next = if n % 2 == 0 { 1000 - n } else { n };
        let mut tx = s.begin().unwrap();
        let (current, _) = scan(&tx, "app/m").remove(0);
        tx.remove("app/m", &current).unwrap();
        tx.put("app/m", &next.to_be_bytes(), b"v");
        s.apply(&tx.into_writes()).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("no reader saw an inconsistent scan") > 0);
    }
}

/// Overwriting private keys leaves the key index as it was: nothing is published (which would
/// copy the index's path to each key), and scans still find every key with its new value. Adding
/// or removing a key publishes a new index.
#[test]
fn overwriting_private_keys_leaves_the_key_index_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = sealed_store(&dir, [5; 32]);
    let write = |f: &dyn Fn(&mut Tx)| {
        let mut tx = s.begin().unwrap();
        f(&mut tx);
        s.apply(&tx.into_writes()).unwrap();
    };
    write(&|tx| (0..3u8).for_each(|n| tx.put("app/m", &[n], b"old")));
    assert_eq!(scan(&s.begin().unwrap(), "app/m").len(), 3, "the first scan indexes the map");
    let version = s.published().0;

    write(&|tx| {
        tx.put("app/m", &[1], b"new");
        tx.put("app/public:p", b"k", b"v");
    });
    assert_eq!(s.published().0, version, "an overwrite published a new index");
    let found = scan(&s.begin().unwrap(), "app/m");
    assert_eq!(found, [(vec![0], b"old".to_vec()), (vec![1], b"new".to_vec()), (vec![2], b"old".to_vec())]);

    write(&|tx| tx.put("app/m", &[3], b"v"));
    assert_eq!(s.published().0, version + 2, "a new key publishes (the union, then the index after)");
    write(&|tx| assert!(tx.remove("app/m", &[0]).unwrap()));
    assert_eq!(s.published().0, version + 4, "so does a removal");
    let keys: Vec<_> = scan(&s.begin().unwrap(), "app/m").into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, [vec![1], vec![2], vec![3]]);
}

/// Each governance view reads its field as the whole record does, however large the record's
/// other fields, and refuses a record that lacks a field the whole record needs, as it does.
#[test]
fn a_governance_view_reads_what_the_whole_record_holds() {
    use gov::{MemberStatus, NodeStatus, ServiceState};
    let (_d, s) = store();
    let large = serde_json::json!({"report": "ab".repeat(2048), "chain": ["c".repeat(1500), "d".repeat(1500)]});
    let mut tx = s.begin().unwrap();
    let nodes = [NodeStatus::Pending, NodeStatus::Trusted, NodeStatus::Retired];
    for (i, status) in nodes.into_iter().enumerate() {
        let node = gov::NodeRecord {
            name: format!("node{i}"),
            status,
            cert: "PEM".into(),
            evidence: large.clone(),
            verified: serde_json::json!({"measurement": "00"}),
            encryption_key: None,
        };
        tx.put(gov::NODES, format!("n{i}").as_bytes(), &serde_json::to_vec(&node).unwrap());
    }
    for (i, status) in [MemberStatus::Accepted, MemberStatus::Active].into_iter().enumerate() {
        let member = gov::MemberRecord { cert: "PEM".into(), status, encryption_key: None, data: large.clone() };
        tx.put(gov::MEMBERS, format!("m{i}").as_bytes(), &serde_json::to_vec(&member).unwrap());
    }
    let user = gov::UserRecord { cert: "PEM".into(), data: large.clone() };
    tx.put(gov::USERS, b"u0", &serde_json::to_vec(&user).unwrap());
    s.apply(&tx.into_writes()).unwrap();

    let tx = s.begin().unwrap();
    for id in ["n0", "n1", "n2", "absent"] {
        assert_eq!(gov::node_status(&tx, id).unwrap(), gov::node(&tx, id).unwrap().map(|n| n.status), "{id}");
    }
    for id in ["m0", "m1", "absent"] {
        assert_eq!(gov::member_status(&tx, id).unwrap(), gov::member(&tx, id).unwrap().map(|m| m.status), "{id}");
    }
    for id in ["u0", "absent"] {
        assert_eq!(gov::is_user(&tx, id).unwrap(), gov::user(&tx, id).unwrap().is_some(), "{id}");
    }
    assert_eq!(gov::service_state(&tx).unwrap(), None);
    for state in [ServiceState::Opening, ServiceState::Open, ServiceState::Recovering] {
        let mut tx = s.begin().unwrap();
        let service = gov::ServiceRecord {
            state,
            cert: "PEM".into(),
            recovery_threshold: 1,
            identity: Some("c".repeat(1500)),
            previous_identities: Vec::new(),
            rekeys_requested: 0,
        };
        tx.put(gov::SERVICE, gov::SERVICE_KEY, &serde_json::to_vec(&service).unwrap());
        assert_eq!(gov::service_state(&tx).unwrap(), Some(state));
        assert_eq!(gov::service(&tx).unwrap().map(|s| s.state), Some(state));
    }

    // A record without its certificate decodes neither way.
    let mut tx = s.begin().unwrap();
    tx.put(gov::NODES, b"bare", br#"{"name":"bare","status":"Trusted"}"#);
    tx.put(gov::MEMBERS, b"bare", br#"{"status":"Active"}"#);
    tx.put(gov::USERS, b"bare", br#"{"data":null}"#);
    tx.put(gov::SERVICE, gov::SERVICE_KEY, br#"{"state":"Open"}"#);
    let refused = |read: &dyn Fn(&Tx)| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&tx))).is_err();
    assert!(refused(&|tx| drop(gov::node(tx, "bare"))) && refused(&|tx| drop(gov::node_status(tx, "bare"))));
    assert!(refused(&|tx| drop(gov::member(tx, "bare"))) && refused(&|tx| drop(gov::member_status(tx, "bare"))));
    assert!(refused(&|tx| drop(gov::user(tx, "bare"))) && refused(&|tx| drop(gov::is_user(tx, "bare"))));
    assert!(refused(&|tx| drop(gov::service(tx))) && refused(&|tx| drop(gov::service_state(tx))));
}

/// A private map enters the index on its first scan, and only that map: writes to a map nobody
/// scans publish nothing. A scan that meets a running write reads the keys from its own
/// snapshot and leaves the map to the next write batch, which indexes it before its own writes.
#[test]
fn private_maps_are_indexed_on_their_first_scan() {
    let dir = tempfile::tempdir().unwrap();
    let s = sealed_store(&dir, [4; 32]);
    let write = |map: &str, keys: std::ops::Range<u8>| {
        let mut tx = s.begin().unwrap();
        keys.for_each(|n| tx.put(map, &[n], &[n]));
        s.apply(&tx.into_writes()).unwrap();
    };
    let indexed = |s: &Store| s.published().2.iter().cloned().collect::<Vec<_>>();
    write("app/a", 0..4);
    write("app/b", 0..4);
    let version = s.published().0;
    assert!(s.published().1.is_empty() && indexed(&s).is_empty(), "nothing scanned, nothing indexed");

    assert_eq!(scan(&s.begin().unwrap(), "app/a").len(), 4);
    assert_eq!(indexed(&s), ["app/a"]);
    assert_eq!(s.published().1.len(), 4, "only the scanned map's keys");
    let version_a = s.published().0;
    assert!(version_a > version);
    write("app/b", 4..8);
    assert_eq!(s.published().0, version_a, "new keys of an unindexed map publish nothing");
    write("app/a", 4..6);
    assert!(s.published().0 > version_a, "new keys of an indexed map do");

    // A write batch is open: the scan cannot index the map now, but still sees all of it.
    let open = s.write_batch().unwrap();
    let tx = s.begin().unwrap();
    assert_eq!(scan(&tx, "app/b").len(), 8);
    assert_eq!(indexed(&s), ["app/a"]);
    assert!(s.index_wanted());
    drop(open);
    // The next write batch indexes it first, so its own new key is in the index too.
    write("app/b", 8..9);
    assert!(!s.index_wanted());
    assert_eq!(indexed(&s), ["app/a", "app/b"]);
    assert_eq!(s.published().1.len(), 6 + 9);
    assert_eq!(scan(&tx, "app/b").len(), 8, "the older transaction keeps its snapshot");
    assert_eq!(scan(&s.begin().unwrap(), "app/b").len(), 9);

    // Neither are empty maps (a scan of any name would grow the set), nor public ones;
    // reopened, nothing is until scanned again.
    assert!(scan(&s.begin().unwrap(), "app/nothing-here").is_empty());
    assert!(!s.index_wanted());
    write("app/public:p", 0..2);
    assert_eq!(scan(&s.begin().unwrap(), "app/public:p").len(), 2);
    assert_eq!(indexed(&s), ["app/a", "app/b"]);
    drop((tx, s));
    let s = sealed_store(&dir, [4; 32]);
    assert!(indexed(&s).is_empty());
    assert_eq!(scan(&s.begin().unwrap(), "app/b").len(), 9);
    assert_eq!(indexed(&s), ["app/b"]);
}

/// A file grown and then mostly emptied compacts to a fraction of its size and keeps what it
/// holds; a file a store has open, a missing file and a file whose bytes were altered are
/// refused with an error, and the missing one is not created.
#[test]
fn compacting_shrinks_the_file_keeps_its_contents_and_refuses_what_it_must_not_touch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let value = vec![7u8; 1024];
    let s = Store::open(&path).unwrap();
    for round in 0..4u32 {
        let mut writes = WriteSet::default();
        for i in 0..5_000u32 {
            writes.put("m", &(round * 5_000 + i).to_be_bytes(), &value);
        }
        s.apply(&writes).unwrap();
    }
    let mut removals = WriteSet::default();
    for i in 100..20_000u32 {
        removals.remove("m", &i.to_be_bytes());
    }
    s.apply(&removals).unwrap();

    let open = compact(&path).unwrap_err().to_string();
    assert!(open.contains("stop its node first"), "{open}");
    drop(s);
    let done = compact(&path).unwrap();
    assert_eq!(done.bytes_after, std::fs::metadata(&path).unwrap().len());
    assert!(done.bytes_after * 4 < done.bytes_before, "{done:?}");
    let s = Store::open(&path).unwrap();
    let kept = scan(&s.begin().unwrap(), "m");
    assert_eq!(kept.len(), 100);
    assert!(kept.iter().enumerate().all(|(i, (k, v))| *k == (i as u32).to_be_bytes() && *v == value));
    drop(s);

    let missing = dir.path().join("missing.redb");
    assert!(compact(&missing).is_err());
    assert!(!missing.exists());

    alter_every_page(&path);
    assert!(compact(&path).is_err(), "an altered file is refused");
}

/// Flips a byte in every page of a database file but its header, as someone writing a stopped
/// node's data folder might.
fn alter_every_page(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    for page in bytes.chunks_mut(4096).skip(1) {
        page[100] ^= 0xff;
    }
    std::fs::write(path, &bytes).unwrap();
}

/// A state database altered outside redb is refused with an error naming it, whether or not it
/// is sealed. (redb trusts a file it closed cleanly: opened without its check, this one panicked
/// on "Malformed allocator state".)
#[test]
fn an_altered_state_database_is_refused_with_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let s = sealed_store(&dir, [9; 32]);
    let mut writes = WriteSet::default();
    for i in 0..5_000u32 {
        writes.put("m", &i.to_be_bytes(), &[7u8; 200]);
    }
    s.apply(&writes).unwrap();
    drop(s);
    alter_every_page(&path);
    let sealed = Store::open_sealed(&path, Arc::new(Sealer::new(&[9; 32]))).err();
    for refused in [sealed, Store::open(&path).err()] {
        let refused = refused.expect("the altered file is refused").to_string();
        assert!(refused.contains("state.redb") && refused.contains("orrupt"), "{refused}");
    }
}

#[test]
fn a_closed_database_is_read_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    assert_eq!(meta_of(&path, "applied").unwrap(), None, "no file, nothing recorded");
    assert!(!path.exists(), "reading does not create the file");
    std::fs::write(&path, b"").unwrap();
    assert_eq!(meta_of(&path, "applied").unwrap(), None, "an empty file, as a crash leaves it");
    std::fs::remove_file(&path).unwrap();
    let sealer = Arc::new(Sealer::new(&Sealer::generate_secret()));
    let store = Store::open_sealed(&path, sealer.clone()).unwrap();
    let mut batch = store.write_batch().unwrap();
    batch.put_meta("applied", b"7").unwrap();
    batch.commit().unwrap();
    drop(store);
    assert_eq!(meta_of(&path, "applied").unwrap().as_deref(), Some(&b"7"[..]));
    assert_eq!(meta_of(&path, "other").unwrap(), None);
    let store = Store::open_sealed(&path, sealer).unwrap();
    assert_eq!(store.meta("applied").unwrap().as_deref(), Some(&b"7"[..]), "the store opens as it was");
    drop(store);
    std::fs::write(&path, b"not a database").unwrap();
    assert!(meta_of(&path, "applied").is_err(), "a file that is no database is an error");
}
