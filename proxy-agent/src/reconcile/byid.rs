//! A map keyed by small dense ids (those `Ids` hands out), held as a list
//! indexed by id: no tree nodes half full (ids are handed out in order, the
//! worst case for a BTreeMap's fill) and no search.

#[derive(Debug)]
pub struct ById<T> {
    items: Vec<Option<T>>,
}

impl<T> Default for ById<T> {
    fn default() -> Self {
        ById { items: Vec::new() }
    }
}

impl<T> ById<T> {
    pub fn get(&self, id: &u32) -> Option<&T> {
        self.items.get(*id as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, id: &u32) -> Option<&mut T> {
        self.items.get_mut(*id as usize)?.as_mut()
    }

    pub fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }

    pub fn insert(&mut self, id: u32, item: T) -> Option<T> {
        let at = id as usize;
        if at >= self.items.len() {
            self.items.resize_with(at + 1, || None);
        }
        self.items[at].replace(item)
    }

    pub fn remove(&mut self, id: &u32) -> Option<T> {
        self.items.get_mut(*id as usize)?.take()
    }

    /// The item at `id`, put there as `T::default()` if there is none.
    pub fn or_default(&mut self, id: u32) -> &mut T
    where
        T: Default,
    {
        if !self.contains_key(&id) {
            self.insert(id, T::default());
        }
        self.items[id as usize].get_or_insert_with(T::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_behaves_as_a_map() {
        let mut m = ById::default();
        assert_eq!(m.insert(5, 'a'), None);
        assert_eq!(m.insert(5, 'b'), Some('a'));
        assert_eq!((m.get(&5), m.get(&4), m.get(&99)), (Some(&'b'), None, None));
        *m.or_default(2) = 'c';
        assert_eq!(m.get(&2), Some(&'c'));
        assert_eq!(m.remove(&5), Some('b'));
        assert_eq!((m.remove(&5), m.remove(&99)), (None, None));
        assert!(m.contains_key(&2) && !m.contains_key(&5));
    }
}
