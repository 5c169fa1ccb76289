//! A map split into independently locked shards, so that unrelated rooms or users do not contend.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

use parking_lot::{Mutex, MutexGuard};

const SHARDS: usize = 64;

pub struct ShardedMap<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: RandomState,
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    pub fn new() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Locks the shard that holds `key`.
    pub fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index].lock()
    }

    /// Runs `f` on every shard in turn (one lock held at a time).
    pub fn for_each_shard(&self, mut f: impl FnMut(&mut HashMap<K, V>)) {
        for shard in self.shards.iter() {
            f(&mut shard.lock());
        }
    }

    /// Entries in all shards (a snapshot; shards are counted one after another).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
