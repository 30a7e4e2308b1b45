//! Which image ids go into which batch: the reference's class-aware SimNet batches, the
//! balanced validation batches and plain shuffled minibatches.
//!
//! The samplers see only `(id, label)` pairs and a generator, so every stage can rebuild the
//! batches of any epoch from `ctx.rng(purpose, epoch)` (same seed, same batches; a resumed run
//! draws what an uninterrupted one would).

use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::BTreeMap;

/// Groups ids by label (labels in ascending order, ids in input order).
fn by_label(items: &[(u32, u32)]) -> BTreeMap<u32, Vec<u32>> {
    let mut m: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for &(id, label) in items {
        m.entry(label).or_default().push(id);
    }
    m
}

/// One epoch of SimNet batches (SPEC step 1 "Batches"): `⌊N / batch⌋` batches; for each, up to
/// `classes` classes are chosen at random among those that still have unused images, then the
/// `batch` slots are filled one at a time with a class drawn uniformly from the chosen set and
/// a random unused image of it (no image repeats within the epoch); a class whose images run
/// out leaves the chosen set and the epoch. A batch whose chosen classes all run out before it
/// is full is returned short, as in the reference (its consumer skips pairs of batches of
/// unequal size); once no class has images left, no more batches are made.
pub fn simnet_batches(
    items: &[(u32, u32)],
    batch: usize,
    classes: usize,
    rng: &mut impl Rng,
) -> Vec<Vec<u32>> {
    if batch == 0 || classes == 0 {
        return Vec::new();
    }
    let mut pools: Vec<(u32, Vec<u32>)> = by_label(items).into_iter().collect();
    let n_batches = items.len() / batch;
    let mut out = Vec::with_capacity(n_batches);
    for _ in 0..n_batches {
        let mut available: Vec<usize> = (0..pools.len())
            .filter(|&c| !pools[c].1.is_empty())
            .collect();
        if available.is_empty() {
            break;
        }
        available.shuffle(rng);
        available.truncate(classes);
        let mut chosen = available;
        let mut b = Vec::with_capacity(batch);
        while b.len() < batch && !chosen.is_empty() {
            let slot = rng.random_range(0..chosen.len());
            let pool = &mut pools[chosen[slot]].1;
            let pick = rng.random_range(0..pool.len());
            b.push(pool.swap_remove(pick));
            if pool.is_empty() {
                chosen.swap_remove(slot);
            }
        }
        out.push(b);
    }
    out
}

/// `n_batches` validation batches of `classes` distinct random classes × `per_class` images
/// (all classes when there are fewer), class after class within a batch. A class with at least
/// `per_class` images gives distinct images; a shorter class is sampled with replacement.
pub fn validation_batches(
    items: &[(u32, u32)],
    n_batches: usize,
    classes: usize,
    per_class: usize,
    rng: &mut impl Rng,
) -> Vec<Vec<u32>> {
    let pools: Vec<Vec<u32>> = by_label(items).into_values().collect();
    let mut out = Vec::with_capacity(n_batches);
    for _ in 0..n_batches {
        let mut order: Vec<usize> = (0..pools.len()).collect();
        order.shuffle(rng);
        order.truncate(classes);
        let mut b = Vec::with_capacity(order.len() * per_class);
        for c in order {
            let pool = &pools[c];
            if pool.len() >= per_class {
                b.extend(
                    rand::seq::index::sample(rng, pool.len(), per_class)
                        .into_iter()
                        .map(|i| pool[i]),
                );
            } else {
                b.extend((0..per_class).map(|_| pool[rng.random_range(0..pool.len())]));
            }
        }
        out.push(b);
    }
    out
}

/// A random permutation of `ids` cut into batches of `batch` (the last one shorter unless
/// `drop_last`).
pub fn shuffled_batches(
    ids: &[u32],
    batch: usize,
    drop_last: bool,
    rng: &mut impl Rng,
) -> Vec<Vec<u32>> {
    if batch == 0 {
        return Vec::new();
    }
    let mut order = ids.to_vec();
    order.shuffle(rng);
    order
        .chunks(batch)
        .filter(|c| !drop_last || c.len() == batch)
        .map(|c| c.to_vec())
        .collect()
}
