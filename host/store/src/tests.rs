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
    let mut tx = s.begin_over(vec![Arc::new(pending)]).unwrap();
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

/// Random operations against a model: every read and every scan agrees with a BTreeMap.
#[test]
fn matches_a_model_under_random_operations() {
    let (_d, s) = store();
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
