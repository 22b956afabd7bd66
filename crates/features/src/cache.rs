//! The operator's in-memory cache of records, keyed by state key, in shards.
//!
//! A hash map grows by moving every entry at once: one map of a few hundred thousand records
//! took 70–150 ms to grow, all inside one batch, and every event queued behind it waited that
//! long. 256 maps, a key's shard chosen by bits of its hash that neither the shard's bucket
//! index nor its tag bytes use, each grow at their own moment by a 256th as much. A shard is
//! also the unit in which a flush collects changed records between batches, and runs of shards
//! ([`CachePart`]) are what the operator's threads change side by side.
//!
//! This module only holds records (and the [`prefetch`] hint with which the operator asks for
//! the records of the events ahead); what to load, write or drop is the operator's.

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, HashTable};

/// Shards per cache.
const SHARDS: usize = 256;
/// A hash's bits that choose its shard start here: above any bucket index a shard can have
/// (its low bits) and below its tag byte (the top seven bits).
const SHARD_SHIFT: u32 = 40;

/// Values by state key, in [`SHARDS`] hash tables. A key is hashed once per lookup.
pub(crate) struct ShardedCache<V> {
    hasher: DefaultHashBuilder,
    shards: Box<[HashTable<(StateKey, V)>]>,
}

impl<V> Default for ShardedCache<V> {
    fn default() -> Self {
        Self {
            hasher: DefaultHashBuilder::default(),
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
        }
    }
}

impl<V> ShardedCache<V> {
    /// The hash of `key` that the `_hashed` lookups take (a batch's keys are hashed once,
    /// however many times they are looked up).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard_of(hash: u64) -> usize {
        (hash >> SHARD_SHIFT) as usize % SHARDS
    }

    /// Which of `parts` parts of [`Self::split_mut`] holds the key whose hash is `hash`.
    pub fn part_of(hash: u64, parts: usize) -> usize {
        Self::shard_of(hash) * parts.clamp(1, SHARDS) / SHARDS
    }

    /// The cache in `parts` parts of whole shards (at most [`SHARDS`]), each of which can be
    /// changed on a thread of its own: part `p` holds the keys that [`Self::part_of`] puts
    /// there.
    pub fn split_mut(&mut self, parts: usize) -> Vec<CachePart<'_, V>> {
        let parts = parts.clamp(1, SHARDS);
        let mut rest = &mut self.shards[..];
        let mut first = 0;
        (0..parts)
            .map(|p| {
                // The first shard of part p + 1: the least `s` with `part_of(s) > p`.
                let end = ((p + 1) * SHARDS).div_ceil(parts);
                let (shards, tail) = std::mem::take(&mut rest).split_at_mut(end - first);
                rest = tail;
                let part = CachePart {
                    hasher: &self.hasher,
                    first,
                    shards,
                };
                first = end;
                part
            })
            .collect()
    }

    pub fn get(&self, key: &[u8]) -> Option<&V> {
        self.get_hashed(self.hash(key), key)
    }

    /// [`Self::get`] for a key whose [`Self::hash`] is `hash`.
    pub fn get_hashed(&self, hash: u64, key: &[u8]) -> Option<&V> {
        self.shards[Self::shard_of(hash)]
            .find(hash, |(k, _)| k.as_bytes() == key)
            .map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }

    /// Bytes of the tables' free slots: a table holds between 7/16 and 7/8 of its slots,
    /// and its empty ones cost as much as full ones (an entry's own slot is the caller's to
    /// count, [`Self::SLOT_BYTES`]).
    pub fn free_slot_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| (s.capacity() - s.len()) * Self::SLOT_BYTES)
            .sum()
    }

    /// One slot: the entry and its control byte.
    pub const SLOT_BYTES: usize = std::mem::size_of::<(StateKey, V)>() + 1;

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.iter().map(|(_, v)| v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&StateKey, &mut V)> {
        self.iter_mut_from(0)
    }

    /// The entries from position `from` of [`Self::iter_mut`]'s order on (skipping whole
    /// shards by their lengths).
    pub fn iter_mut_from(&mut self, from: usize) -> impl Iterator<Item = (&StateKey, &mut V)> {
        let mut skip = from;
        let mut first = 0;
        for shard in self.shards.iter() {
            if skip < shard.len() {
                break;
            }
            skip -= shard.len();
            first += 1;
        }
        self.shards[first..]
            .iter_mut()
            .flat_map(|s| s.iter_mut().map(|(k, v)| (&*k, v)))
            .skip(skip)
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The entries of shard `shard`.
    pub fn shard_iter_mut(&mut self, shard: usize) -> impl Iterator<Item = (&StateKey, &mut V)> {
        self.shards[shard].iter_mut().map(|(k, v)| (&*k, v))
    }

    /// Keeps the entries `keep` says to; a table left less than a quarter full gives back
    /// half its slots (a trimmed cache's free slots are memory too).
    pub fn retain(&mut self, mut keep: impl FnMut(&StateKey, &mut V) -> bool) {
        let hasher = &self.hasher;
        for shard in self.shards.iter_mut() {
            shard.retain(|(k, v)| keep(k, v));
            if shard.len() < shard.capacity() / 4 {
                shard.shrink_to(shard.len() * 2, |(k, _)| hasher.hash_one(k.as_bytes()));
            }
        }
    }
}

/// A run of whole shards of a [`ShardedCache`], borrowed from it to be changed apart from the
/// others (see [`ShardedCache::split_mut`]).
pub(crate) struct CachePart<'c, V> {
    hasher: &'c DefaultHashBuilder,
    /// The cache's index of `shards[0]`.
    first: usize,
    shards: &'c mut [HashTable<(StateKey, V)>],
}

impl<V> CachePart<'_, V> {
    /// This part's table for `hash`, which must be one of its keys' (the caller routed it
    /// here with [`ShardedCache::part_of`]).
    fn table(&self, hash: u64) -> Option<&HashTable<(StateKey, V)>> {
        let shard = ShardedCache::<V>::shard_of(hash).checked_sub(self.first)?;
        self.shards.get(shard)
    }

    /// [`ShardedCache::get_hashed`], for the keys of this part.
    pub fn get_hashed(&self, hash: u64, key: &[u8]) -> Option<&V> {
        self.table(hash)?
            .find(hash, |(k, _)| k.as_bytes() == key)
            .map(|(_, v)| v)
    }

    /// The value under `key`, whose [`ShardedCache::hash`] is `hash`, or the one `make` makes
    /// (inserted); whether it was inserted.
    ///
    /// # Panics
    ///
    /// If `hash` is not one of this part's (a caller's routing bug, not something input can
    /// cause).
    pub fn get_or_try_insert_hashed<E>(
        &mut self,
        hash: u64,
        key: &[u8],
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<(&mut V, bool), E> {
        let shard = ShardedCache::<V>::shard_of(hash) - self.first;
        let hasher = self.hasher;
        match self.shards[shard].entry(
            hash,
            |(k, _)| k.as_bytes() == key,
            |(k, _)| hasher.hash_one(k.as_bytes()),
        ) {
            Entry::Occupied(entry) => Ok((&mut entry.into_mut().1, false)),
            Entry::Vacant(entry) => {
                let value = make()?;
                let entry = entry.insert((StateKey::from(key), value));
                Ok((&mut entry.into_mut().1, true))
            }
        }
    }
}

/// Asks the CPU to start loading the cache line that holds `at` into its caches, so that a
/// later read of it need not wait on memory. A hint only: nothing is read or written.
#[inline(always)]
pub(crate) fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address (an invalid one is ignored), and
    // changes nothing a program can observe; SSE, which it needs, is part of every x86_64
    // target. Measured (features bench, W1 with 30-day windows): prefetching the records of
    // the events ahead took 1.5–1.6M events/s to 2.6–2.7M; no safe API issues the hint.
    #[allow(unsafe_code)]
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// [`prefetch`] for every cache line `value` spans.
#[inline(always)]
pub(crate) fn prefetch_all<T>(value: &T) {
    let at: *const u8 = (value as *const T).cast();
    for offset in (0..std::mem::size_of::<T>()).step_by(64) {
        prefetch(at.wrapping_add(offset));
    }
}

/// What an allocation of `bytes` takes from the allocator: the size rounded up to its size
/// class (8-byte steps up to 64 bytes, then four classes per power of two, as mimalloc's; the
/// system allocators' are no coarser). Growing vectors land anywhere in a class, so counting
/// requested bytes alone undercounted records' memory by about a sixth.
pub(crate) fn allocated(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    if bytes <= 64 {
        return bytes.next_multiple_of(8);
    }
    let step = 1usize << ((usize::BITS - (bytes - 1).leading_zeros()) - 3);
    bytes.next_multiple_of(step)
}

/// A state key as the cache holds it: inline up to [`StateKey::INLINE`] bytes (an 8-byte
/// entity id and a key of up to 38 bytes, a UUID included), so that a lookup compares keys
/// without another trip to memory; longer keys on the heap.
#[derive(Clone)]
pub(crate) enum StateKey {
    Inline {
        len: u8,
        bytes: [u8; StateKey::INLINE],
    },
    Heap(Box<[u8]>),
}

impl StateKey {
    const INLINE: usize = 46;

    /// Heap bytes a key of `len` bytes holds beyond its slot.
    pub(crate) fn heap_bytes(len: usize) -> usize {
        if len > Self::INLINE {
            allocated(len)
        } else {
            0
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            StateKey::Inline { len, bytes } => &bytes[..*len as usize],
            StateKey::Heap(bytes) => bytes,
        }
    }
}

impl From<&[u8]> for StateKey {
    fn from(key: &[u8]) -> Self {
        if key.len() > StateKey::INLINE {
            return StateKey::Heap(key.into());
        }
        let mut bytes = [0; StateKey::INLINE];
        bytes[..key.len()].copy_from_slice(key);
        StateKey::Inline {
            len: key.len() as u8,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    /// Inserts `value` under `key` unless it is there; whether it was inserted.
    fn insert<V>(cache: &mut super::ShardedCache<V>, key: &[u8], value: V) -> bool {
        let hash = cache.hash(key);
        let mut whole = cache.split_mut(1);
        let (_, inserted) = whole[0]
            .get_or_try_insert_hashed(hash, key, || Ok::<_, ()>(value))
            .unwrap();
        inserted
    }

    #[test]
    fn allocations_count_by_size_class() {
        assert_eq!(super::allocated(0), 0);
        assert_eq!(super::allocated(1), 8);
        assert_eq!(super::allocated(64), 64);
        // Four classes per power of two above 64: 80, 96, 112, 128, then 160, ...
        assert_eq!(super::allocated(65), 80);
        assert_eq!(super::allocated(128), 128);
        assert_eq!(super::allocated(129), 160);
        assert_eq!(super::allocated(1000), 1024);
        assert_eq!(super::allocated(1025), 1280);
        for n in 1..5000 {
            let a = super::allocated(n);
            assert!(a >= n && a <= n + n / 4 + 8, "{n} -> {a}");
        }
    }

    #[test]
    fn free_slots_count_and_a_trimmed_table_gives_them_back() {
        let mut cache = ShardedCache::<u64>::default();
        assert_eq!(cache.free_slot_bytes(), 0);
        for i in 0..10_000u64 {
            insert(&mut cache, &i.to_le_bytes(), i);
        }
        let full = cache.free_slot_bytes();
        assert!(full > 0);
        cache.retain(|_, v| *v % 100 == 0);
        assert_eq!(cache.len(), 100);
        // 100 entries left in 256 tables: the emptied tables shrank.
        assert!(
            cache.free_slot_bytes() < full / 4,
            "{} of {full}",
            cache.free_slot_bytes()
        );
    }

    use super::*;

    #[test]
    fn keys_spread_over_the_shards_and_are_found_in_theirs() {
        let mut cache = ShardedCache::<u32>::default();
        let keys: Vec<String> = (0..10_000).map(|i| format!("customer-{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(insert(&mut cache, k.as_bytes(), i as u32));
        }
        assert_eq!(cache.len(), keys.len());
        assert!(keys.iter().all(|k| cache.contains_key(k.as_bytes())));
        assert!(!cache.contains_key(b"customer-10000"));
        let hash = cache.hash(b"customer-7");
        let mut whole = cache.split_mut(1);
        let (found, inserted) = whole[0]
            .get_or_try_insert_hashed(hash, b"customer-7", || Err::<u32, _>("not called"))
            .unwrap();
        assert_eq!((*found, inserted), (7, false));
        // No shard is empty or holds more than twice its share.
        for shard in cache.shards.iter() {
            assert!(
                (1..=2 * keys.len() / SHARDS).contains(&shard.len()),
                "{}",
                shard.len()
            );
        }
        cache.retain(|_, v| *v % 2 == 0);
        assert_eq!(cache.len(), keys.len() / 2);
        assert_eq!(cache.values().filter(|v| *v % 2 == 1).count(), 0);
        for (_, v) in cache.iter_mut() {
            *v += 1;
        }
        assert!(cache.values().all(|v| v % 2 == 1));
    }

    #[test]
    fn a_split_cache_finds_each_key_in_the_part_its_hash_names() {
        let mut cache = ShardedCache::<u32>::default();
        for i in 0..5_000u32 {
            insert(&mut cache, &i.to_le_bytes(), i);
        }
        let hashes: Vec<u64> = (0..5_000u32)
            .map(|i| cache.hash(&i.to_le_bytes()))
            .collect();
        for parts in [1, 2, 3, 7, 256, 300] {
            let mut split = cache.split_mut(parts);
            assert_eq!(split.len(), parts.min(SHARDS));
            let mut per_part = vec![0; split.len()];
            for (i, &hash) in hashes.iter().enumerate() {
                let key = (i as u32).to_le_bytes();
                let p = ShardedCache::<u32>::part_of(hash, parts);
                per_part[p] += 1;
                assert_eq!(split[p].get_hashed(hash, &key), Some(&(i as u32)));
                // The other parts do not hold it.
                for (q, other) in split.iter().enumerate().filter(|(q, _)| *q != p) {
                    assert_eq!(other.get_hashed(hash, &key), None, "part {q} of {parts}");
                }
                let (found, inserted) = split[p]
                    .get_or_try_insert_hashed(hash, &key, || Err::<u32, _>("not called"))
                    .unwrap();
                assert_eq!((*found, inserted), (i as u32, false));
            }
            // Each part holds about its share (shards of about 20 keys vary more).
            if parts <= 7 {
                for n in per_part {
                    assert!(n > 5_000 / parts / 2, "{n} keys in a part of {parts}");
                }
            }
        }
    }
}
