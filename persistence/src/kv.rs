//! The store's ordered key-value trees: sled's on disk, or plain ordered
//! maps in memory (`BusBuilder::in_memory`).
//!
//! The store is written against [`Tree`] and [`Batch`], which offer exactly
//! the subset of sled's API it uses (and sled's error and value types), so
//! the same store code — records, index, offsets, delays, retention, the
//! local outbox — runs on both, and an in-memory bus has the embedded
//! store's semantics without a temporary sled database underneath: no page
//! cache, no log, no flusher or I/O threads, nothing on disk.
//!
//! A memory tree's iterators are lazy and hold no lock between items: each
//! step takes the read lock, finds the next key past the last one returned
//! and releases the lock — as with sled, a scan sees writes that land ahead
//! of it, and a writer never waits for a slow reader.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) use sled::IVec;

type Map = BTreeMap<IVec, IVec>;

/// What an entry of a memory tree is counted as besides its key and value
/// bytes (the map's node share and the two `IVec` headers, roughly).
const ENTRY_OVERHEAD: u64 = 64;

fn entry_bytes(k: &[u8], v: &[u8]) -> u64 {
    (k.len() + v.len()) as u64 + ENTRY_OVERHEAD
}

/// A memory tree: its map, and the byte count it shares with the other
/// trees of its store (what the memory budget is checked against).
pub(crate) struct MemTree {
    map: RwLock<Map>,
    held: Arc<AtomicU64>,
}

impl MemTree {
    fn put(&self, map: &mut Map, k: IVec, v: IVec) -> Option<IVec> {
        self.held.fetch_add(entry_bytes(&k, &v), Ordering::Relaxed);
        let old = map.insert(k.clone(), v);
        if let Some(o) = &old {
            self.held.fetch_sub(entry_bytes(&k, o), Ordering::Relaxed);
        }
        old
    }

    fn take(&self, map: &mut Map, k: &[u8]) -> Option<IVec> {
        let old = map.remove(k);
        if let Some(o) = &old {
            self.held.fetch_sub(entry_bytes(k, o), Ordering::Relaxed);
        }
        old
    }

    fn apply(&self, map: &mut Map, batch: Batch) {
        for (k, v) in batch.ops {
            match v {
                Some(v) => {
                    self.put(map, k, v);
                }
                None => {
                    self.take(map, &k);
                }
            }
        }
    }
}

/// One ordered tree of the store.
#[derive(Clone)]
pub(crate) enum Tree {
    /// A sled tree (the data directory).
    Sled(sled::Tree),
    /// An ordered map in memory.
    Mem(Arc<MemTree>),
}

impl fmt::Debug for MemTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemTree")
    }
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tree::Sled(_) => f.write_str("Tree::Sled"),
            Tree::Mem(_) => f.write_str("Tree::Mem"),
        }
    }
}

/// Writes to one tree, applied together (sled: atomically).
#[derive(Debug, Default, Clone)]
pub(crate) struct Batch {
    ops: Vec<(IVec, Option<IVec>)>,
}

impl Batch {
    /// Sets `key` to `value`.
    pub(crate) fn insert<K: Into<IVec>, V: Into<IVec>>(&mut self, key: K, value: V) {
        self.ops.push((key.into(), Some(value.into())));
    }

    /// Removes `key`.
    pub(crate) fn remove<K: Into<IVec>>(&mut self, key: K) {
        self.ops.push((key.into(), None));
    }

    fn into_sled(self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in self.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b
    }
}

fn read(m: &RwLock<Map>) -> RwLockReadGuard<'_, Map> {
    // A panic while holding the lock left the map as the last write did:
    // each write is one map operation (or one batch on the only writer).
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write(m: &RwLock<Map>) -> RwLockWriteGuard<'_, Map> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn owned(b: Bound<&impl AsRef<[u8]>>) -> Bound<IVec> {
    match b {
        Bound::Included(k) => Bound::Included(IVec::from(k.as_ref())),
        Bound::Excluded(k) => Bound::Excluded(IVec::from(k.as_ref())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest key above every key starting with `prefix` (`Unbounded`
/// when there is none: the prefix is all `0xff`).
fn prefix_end(prefix: &[u8]) -> Bound<IVec> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Bound::Excluded(IVec::from(end));
        }
    }
    Bound::Unbounded
}

impl Tree {
    /// An empty tree in memory, counting its bytes into `held`.
    pub(crate) fn memory(held: Arc<AtomicU64>) -> Tree {
        Tree::Mem(Arc::new(MemTree {
            map: RwLock::new(Map::new()),
            held,
        }))
    }

    /// The value of `key`.
    pub(crate) fn get<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<IVec>> {
        match self {
            Tree::Sled(t) => t.get(key),
            Tree::Mem(m) => Ok(read(&m.map).get(key.as_ref()).cloned()),
        }
    }

    /// Sets `key` to `value`; the value it had.
    pub(crate) fn insert<K: AsRef<[u8]>, V: Into<IVec>>(
        &self,
        key: K,
        value: V,
    ) -> sled::Result<Option<IVec>> {
        match self {
            Tree::Sled(t) => t.insert(key, value),
            Tree::Mem(m) => Ok(m.put(&mut write(&m.map), IVec::from(key.as_ref()), value.into())),
        }
    }

    /// Removes `key`; the value it had.
    #[cfg(test)]
    pub(crate) fn remove<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<IVec>> {
        match self {
            Tree::Sled(t) => t.remove(key),
            Tree::Mem(m) => Ok(m.take(&mut write(&m.map), key.as_ref())),
        }
    }

    /// Applies `batch` (sled: atomically).
    pub(crate) fn apply_batch(&self, batch: Batch) -> sled::Result<()> {
        match self {
            Tree::Sled(t) => t.apply_batch(batch.into_sled()),
            Tree::Mem(m) => {
                m.apply(&mut write(&m.map), batch);
                Ok(())
            }
        }
    }

    /// Whether the tree holds no key.
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Tree::Sled(t) => t.is_empty(),
            Tree::Mem(m) => read(&m.map).is_empty(),
        }
    }

    /// How many keys the tree holds (sled: counts them all).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        match self {
            Tree::Sled(t) => t.len(),
            Tree::Mem(m) => read(&m.map).len(),
        }
    }

    /// The entries with keys in `range`, in key order (or reversed).
    pub(crate) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        match self {
            Tree::Sled(t) => Iter::Sled(t.range(range)),
            Tree::Mem(m) => Iter::Mem(MemIter {
                map: m.clone(),
                lo: owned(range.start_bound()),
                hi: owned(range.end_bound()),
            }),
        }
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub(crate) fn scan_prefix<P: AsRef<[u8]>>(&self, prefix: P) -> Iter {
        match self {
            Tree::Sled(t) => Iter::Sled(t.scan_prefix(prefix)),
            Tree::Mem(m) => Iter::Mem(MemIter {
                map: m.clone(),
                lo: Bound::Included(IVec::from(prefix.as_ref())),
                hi: prefix_end(prefix.as_ref()),
            }),
        }
    }

    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> Iter {
        self.range::<&[u8], _>(..)
    }

    /// Applies `batch` to `self` and `ops` to `other` as one transaction
    /// (sled: a transaction over both trees; memory: both maps locked).
    /// `ops` are `(key, Some(value))` to set and `(key, None)` to remove.
    pub(crate) fn apply_with(
        &self,
        batch: Batch,
        other: &Tree,
        ops: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), sled::transaction::TransactionError<()>> {
        use sled::transaction::{ConflictableTransactionError, Transactional};
        match (self, other) {
            (Tree::Sled(a), Tree::Sled(b)) => {
                let batch = batch.into_sled();
                (a, b).transaction(|(a_tx, b_tx)| {
                    a_tx.apply_batch(&batch)?;
                    for (k, v) in ops {
                        match v {
                            Some(v) => {
                                b_tx.insert(*k, *v)?;
                            }
                            None => {
                                b_tx.remove(*k)?;
                            }
                        }
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
            }
            (Tree::Mem(a), Tree::Mem(b)) => {
                let mut a_map = write(&a.map);
                let mut b_map = write(&b.map);
                a.apply(&mut a_map, batch);
                for (k, v) in ops {
                    match v {
                        Some(v) => {
                            b.put(&mut b_map, IVec::from(*k), IVec::from(*v));
                        }
                        None => {
                            b.take(&mut b_map, k);
                        }
                    }
                }
                Ok(())
            }
            _ => unreachable!("a store's trees are all on disk or all in memory"),
        }
    }
}

/// An iterator over a tree's entries (see the module docs for memory).
pub(crate) enum Iter {
    /// sled's own.
    Sled(sled::Iter),
    /// A memory tree's.
    Mem(MemIter),
}

/// A lazy iterator over a memory tree: the bounds left to visit.
pub(crate) struct MemIter {
    map: Arc<MemTree>,
    lo: Bound<IVec>,
    hi: Bound<IVec>,
}

impl MemIter {
    fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        fn as_slice(b: &Bound<IVec>) -> Bound<&[u8]> {
            match b {
                Bound::Included(k) => Bound::Included(k.as_ref()),
                Bound::Excluded(k) => Bound::Excluded(k.as_ref()),
                Bound::Unbounded => Bound::Unbounded,
            }
        }
        (as_slice(&self.lo), as_slice(&self.hi))
    }

    /// Whether the bounds are empty or inverted (BTreeMap::range panics
    /// on an inverted range; sled's yields nothing).
    fn exhausted(&self) -> bool {
        match (&self.lo, &self.hi) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a), Bound::Excluded(b))
            | (Bound::Excluded(a), Bound::Included(b))
            | (Bound::Excluded(a), Bound::Excluded(b)) => a >= b,
            _ => false,
        }
    }
}

impl MemIter {
    /// The next entry from the front (or the back), moving that bound past
    /// it; after the first `None` the bounds are emptied, so the iterator
    /// stays done.
    fn step(&mut self, back: bool) -> Option<sled::Result<(IVec, IVec)>> {
        if self.exhausted() {
            return None;
        }
        let found = {
            let map = read(&self.map.map);
            let mut range = map.range::<[u8], _>(self.bounds());
            let entry = if back {
                range.next_back()
            } else {
                range.next()
            };
            entry.map(|(k, v)| (k.clone(), v.clone()))
        };
        match found {
            Some((k, v)) => {
                let past = Bound::Excluded(k.clone());
                if back {
                    self.hi = past;
                } else {
                    self.lo = past;
                }
                Some(Ok((k, v)))
            }
            None => {
                self.lo = Bound::Included(IVec::default());
                self.hi = Bound::Excluded(IVec::default());
                None
            }
        }
    }
}

impl Iterator for Iter {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Sled(i) => i.next(),
            Iter::Mem(i) => i.step(false),
        }
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Sled(i) => i.next_back(),
            Iter::Mem(i) => i.step(true),
        }
    }
}

impl Iter {
    /// The keys only.
    pub(crate) fn keys(self) -> impl DoubleEndedIterator<Item = sled::Result<IVec>> {
        self.map(|r| r.map(|(k, _)| k))
    }

    /// The values only.
    pub(crate) fn values(self) -> impl DoubleEndedIterator<Item = sled::Result<IVec>> {
        self.map(|r| r.map(|(_, v)| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> Vec<Tree> {
        let db = sled::Config::new().temporary(true).open().unwrap();
        vec![
            Tree::Sled(db.open_tree("t").unwrap()),
            Tree::memory(Arc::default()),
        ]
    }

    fn keys(i: Iter) -> Vec<Vec<u8>> {
        i.map(|r| r.unwrap().0.to_vec()).collect()
    }

    #[test]
    fn memory_trees_answer_as_sled_does() {
        for t in both() {
            let mut b = Batch::default();
            for k in [&b"a1"[..], b"a2", b"a3", b"b", b"\xff\xff", b"\xff\xff\x01"] {
                b.insert(k, k);
            }
            b.remove(&b"a3"[..]);
            t.apply_batch(b).unwrap();
            assert_eq!(t.len(), 5, "{t:?}");
            assert_eq!(keys(t.scan_prefix(b"a")), [b"a1".to_vec(), b"a2".to_vec()]);
            assert_eq!(
                keys(t.scan_prefix(b"\xff\xff")),
                [b"\xff\xff".to_vec(), b"\xff\xff\x01".to_vec()]
            );
            assert_eq!(keys(t.range(&b"a2"[..]..&b"b"[..])), [b"a2".to_vec()]);
            assert_eq!(
                t.range(&b"a"[..]..=&b"b"[..])
                    .next_back()
                    .unwrap()
                    .unwrap()
                    .0,
                b"b"
            );
            // An inverted range yields nothing (no panic).
            assert!(t.range(&b"b"[..]..&b"a"[..]).next().is_none());
            // Both ends of one iterator meet without repeating.
            let mut i = t.iter();
            let first = i.next().unwrap().unwrap().0;
            let last = i.next_back().unwrap().unwrap().0;
            assert_eq!(
                (first.as_ref(), last.as_ref()),
                (&b"a1"[..], &b"\xff\xff\x01"[..])
            );
            assert_eq!(i.count(), 3);
            // A scan holds no lock between items: a write in the middle
            // of one goes through (in memory the scan then sees it; sled
            // promises nothing either way, and the store relies on neither).
            let mut i = t.iter();
            i.next();
            t.insert(b"a9", &b"x"[..]).unwrap();
            assert_eq!(i.next().unwrap().unwrap().0, b"a2");
            if matches!(t, Tree::Mem(_)) {
                assert_eq!(i.next().unwrap().unwrap().0, b"a9");
            }
            assert_eq!(t.remove(b"a9").unwrap().as_deref(), Some(&b"x"[..]));
        }
    }

    #[test]
    fn a_memory_store_counts_the_bytes_it_holds() {
        let held = Arc::new(AtomicU64::new(0));
        let (a, b) = (Tree::memory(held.clone()), Tree::memory(held.clone()));
        a.insert(b"k", vec![0u8; 100]).unwrap();
        assert_eq!(held.load(Ordering::Relaxed), 101 + ENTRY_OVERHEAD);
        // Replacing counts the new value instead of the old.
        a.insert(b"k", vec![0u8; 10]).unwrap();
        assert_eq!(held.load(Ordering::Relaxed), 11 + ENTRY_OVERHEAD);
        let mut batch = Batch::default();
        batch.insert(&b"x"[..], vec![0u8; 1000]);
        batch.remove(&b"k"[..]);
        a.apply_with(batch, &b, &[(b"s", Some(b"vv"))]).unwrap();
        assert_eq!(held.load(Ordering::Relaxed), 1001 + 3 + 2 * ENTRY_OVERHEAD);
        a.remove(b"x").unwrap();
        b.remove(b"s").unwrap();
        // Removing a key that is not there changes nothing.
        b.remove(b"s").unwrap();
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_batch_and_ops_on_another_tree_apply_together() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let pairs = [
            (
                Tree::Sled(db.open_tree("a").unwrap()),
                Tree::Sled(db.open_tree("b").unwrap()),
            ),
            (Tree::memory(Arc::default()), Tree::memory(Arc::default())),
        ];
        for (a, b) in pairs {
            b.insert(b"gone", &b"x"[..]).unwrap();
            let mut batch = Batch::default();
            batch.insert(&b"k"[..], &b"1"[..]);
            a.apply_with(batch, &b, &[(b"c", Some(b"v")), (b"gone", None)])
                .unwrap();
            assert_eq!(a.get(b"k").unwrap().as_deref(), Some(&b"1"[..]));
            assert_eq!(b.get(b"c").unwrap().as_deref(), Some(&b"v"[..]));
            assert!(b.get(b"gone").unwrap().is_none());
        }
    }
}
