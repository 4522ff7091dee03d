//! Small reusable ids, lowest first; 0 is never handed out.

use std::collections::BTreeSet;

#[derive(Debug)]
pub struct Ids {
    next: u32,
    free: BTreeSet<u32>,
    limit: u32,
}

impl Ids {
    pub fn new(limit: u32) -> Self {
        Ids {
            next: 1,
            free: BTreeSet::new(),
            limit,
        }
    }

    pub fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    pub fn give_back(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Marks an id found in the maps as taken; false if it cannot be.
    pub fn claim(&mut self, id: u32) -> bool {
        if id == 0 || id >= self.limit {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            return true;
        }
        self.free.remove(&id)
    }
}
