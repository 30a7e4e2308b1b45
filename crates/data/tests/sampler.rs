//! Sampler invariants: no repeats within an epoch, classes per batch, sizes, determinism.

use simtrans_core::seed::rng;
use simtrans_data::sampler::{shuffled_batches, simnet_batches, validation_batches};
use std::collections::{HashMap, HashSet};

/// Unbalanced classes: class c has 5 + 7c images; ids are unique.
fn items(classes: u32) -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    let mut id = 0;
    for c in 0..classes {
        for _ in 0..(5 + 7 * c) {
            v.push((id, c));
            id += 1;
        }
    }
    v
}

#[test]
fn simnet_batches_follow_the_reference_rules() {
    let items = items(12);
    let label: HashMap<u32, u32> = items.iter().copied().collect();
    let batches = simnet_batches(&items, 50, 4, &mut rng(1, &["t"], 0));
    assert_eq!(batches.len(), items.len() / 50);
    let mut seen = HashSet::new();
    for b in &batches {
        assert!(b.len() <= 50 && !b.is_empty());
        for id in b {
            assert!(seen.insert(*id), "id {id} repeated within the epoch");
        }
        let classes: HashSet<u32> = b.iter().map(|id| label[id]).collect();
        assert!(classes.len() <= 4, "{} classes in a batch", classes.len());
    }
    // With plenty of images the early batches are full.
    assert_eq!(batches[0].len(), 50);
    // Two classes per batch, as for the web batches B.
    for b in simnet_batches(&items, 50, 2, &mut rng(2, &["t"], 0)) {
        let classes: HashSet<u32> = b.iter().map(|id| label[id]).collect();
        assert!(classes.len() <= 2);
    }
}

#[test]
fn simnet_batches_run_short_when_chosen_classes_run_out() {
    // Two classes of 3 images, batches of 5 from one class at a time: the chosen class runs
    // out after 3 slots, so the batch is short.
    let items: Vec<(u32, u32)> = (0..6).map(|i| (i, i / 3)).collect();
    let batches = simnet_batches(&items, 5, 1, &mut rng(0, &["t"], 0));
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].len(), 3);
}

#[test]
fn samplers_are_deterministic() {
    let items = items(6);
    let ids: Vec<u32> = items.iter().map(|p| p.0).collect();
    for seed in 0..3 {
        assert_eq!(
            simnet_batches(&items, 20, 3, &mut rng(seed, &["t"], 0)),
            simnet_batches(&items, 20, 3, &mut rng(seed, &["t"], 0))
        );
        assert_eq!(
            validation_batches(&items, 3, 4, 10, &mut rng(seed, &["v"], 0)),
            validation_batches(&items, 3, 4, 10, &mut rng(seed, &["v"], 0))
        );
        assert_eq!(
            shuffled_batches(&ids, 7, false, &mut rng(seed, &["s"], 0)),
            shuffled_batches(&ids, 7, false, &mut rng(seed, &["s"], 0))
        );
    }
    assert_ne!(
        simnet_batches(&items, 20, 3, &mut rng(0, &["t"], 0)),
        simnet_batches(&items, 20, 3, &mut rng(1, &["t"], 0))
    );
}

#[test]
fn validation_batches_are_balanced_and_fill_short_classes_with_replacement() {
    let items = items(12); // class 0 has 5 images, fewer than 10
    let label: HashMap<u32, u32> = items.iter().copied().collect();
    let batches = validation_batches(&items, 20, 10, 10, &mut rng(3, &["v"], 0));
    assert_eq!(batches.len(), 20);
    let mut saw_short_class = false;
    for b in &batches {
        assert_eq!(b.len(), 100);
        for chunk in b.chunks(10) {
            let c = label[&chunk[0]];
            assert!(
                chunk.iter().all(|id| label[id] == c),
                "a class block mixes classes"
            );
            let distinct: HashSet<_> = chunk.iter().collect();
            if c == 0 {
                saw_short_class = true;
                assert!(distinct.len() <= 5);
            } else {
                assert_eq!(
                    distinct.len(),
                    10,
                    "class {c} has enough images for no repeats"
                );
            }
        }
        let classes: HashSet<u32> = b.iter().map(|id| label[id]).collect();
        assert_eq!(classes.len(), 10);
    }
    assert!(saw_short_class);
    // Fewer classes than asked: all of them.
    let few = validation_batches(&items[..17], 1, 10, 4, &mut rng(0, &["v"], 0));
    assert_eq!(few[0].len(), 2 * 4);
}

#[test]
fn shuffled_batches_cover_every_id_once() {
    let ids: Vec<u32> = (100..123).collect();
    let b = shuffled_batches(&ids, 5, false, &mut rng(0, &["s"], 0));
    assert_eq!(
        b.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![5, 5, 5, 5, 3]
    );
    let mut all: Vec<u32> = b.concat();
    assert_ne!(all, ids, "not shuffled");
    all.sort();
    assert_eq!(all, ids);
    let dropped = shuffled_batches(&ids, 5, true, &mut rng(0, &["s"], 0));
    assert_eq!(dropped.len(), 4);
    assert!(dropped.iter().all(|b| b.len() == 5));
}
