//! Prefetching yields exactly the loader's batches, in order, and stops cleanly when dropped;
//! a panic while building a batch reaches the consumer; the bench runs end to end on a few files.

use simtrans_core::config::{Config, DemoConfig, Preset};
use simtrans_data::{Augment, Loader, Split};
use std::sync::Arc;

#[test]
fn prefetched_batches_equal_direct_batches() {
    let mut config = Config::preset(Preset::Demo);
    config.data.demo = DemoConfig {
        base_train_per_class: 8,
        base_val_per_class: 1,
        web_per_class: 10,
        novel_test_per_class: 2,
        ..DemoConfig::default_recipe()
    };
    let (index, _) = simtrans_data::build_index(&config, 0).unwrap();
    let index = Arc::new(index);
    let loader = Loader::new(index.clone(), &config.data).unwrap();
    let ids: Vec<u32> = index
        .items_in(Split::BaseTrain)
        .iter()
        .map(|i| i.id)
        .collect();
    let batches: Vec<Vec<u32>> = ids.chunks(5).map(|c| c.to_vec()).collect();
    let seeds: Vec<u64> = (0..batches.len() as u64).map(|b| 100 + b).collect();
    let dev = candle_core::Device::Cpu;
    let got: Vec<_> = loader
        .prefetch(batches.clone(), seeds.clone(), Augment::Train, 2, &dev)
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(got.len(), batches.len());
    let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for ((ids, t), (b, s)) in got.iter().zip(batches.iter().zip(&seeds)) {
        assert_eq!(ids, b);
        let direct = loader.batch(b, Augment::Train, *s, &dev).unwrap();
        assert_eq!(values(t), values(&direct));
    }
    // The evaluation form: the test transform, whatever seed the loader is given.
    let tested: Vec<_> = loader
        .prefetch_test(batches.clone(), &dev)
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(tested.len(), batches.len());
    for ((ids, t), b) in tested.iter().zip(&batches) {
        assert_eq!(ids, b);
        let direct = loader.batch(b, Augment::Test, 12345, &dev).unwrap();
        assert_eq!(values(t), values(&direct));
    }
    // Taking one batch and dropping the rest must not hang.
    let mut it = loader.prefetch(batches, seeds, Augment::Train, 1, &dev);
    assert!(it.next().unwrap().is_ok());
    drop(it);
    // An unknown id surfaces as an error in order, then the iterator ends.
    let mut bad = loader.prefetch(
        vec![vec![0], vec![u32::MAX], vec![1]],
        vec![0, 0, 0],
        Augment::Test,
        2,
        &dev,
    );
    assert!(bad.next().unwrap().is_ok());
    assert!(bad.next().unwrap().is_err());
    assert!(bad.next().is_none());
}

#[test]
fn bench_runs_on_a_few_jpeg_files() {
    let mut cfg = Config::preset(Preset::Paper).data;
    cfg.image_size = 32;
    let r = simtrans_data::bench(&cfg, 3, 2, 1, None).unwrap();
    assert_eq!(r.images, 3);
    assert_eq!(r.files, 3);
    assert!(r.images_per_second > 0.0);
}

#[test]
fn a_panic_while_building_a_batch_reaches_the_consumer() {
    use simtrans_core::config::DatasetKind;
    use simtrans_data::{DataIndex, Images, Item};
    // Two items but the pixels of one image only: building the second batch panics on the
    // producer thread. The loop must not see that as the end of its batches.
    let items = (0..2)
        .map(|id| Item::clean(id, 0, Split::BaseTrain))
        .collect();
    let index = DataIndex {
        dataset: DatasetKind::Demo,
        class_names: vec!["a".into(), "b".into()],
        base_classes: vec![0],
        novel_classes: vec![1],
        items,
        images: Images::Pixels {
            height: 4,
            width: 4,
            data: vec![7; 16],
        },
    };
    let config = Config::preset(Preset::Demo);
    let loader = Loader::new(Arc::new(index), &config.data).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut it = loader.prefetch(vec![vec![0], vec![1]], vec![0, 0], Augment::Test, 1, &dev);
    assert!(it.next().unwrap().is_ok());
    let rest = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| it.next().is_some()));
    assert!(
        rest.is_err(),
        "the producer's panic ended the batches silently"
    );
}

#[test]
fn the_consumers_wait_for_batches_is_measured() {
    let config = Config::preset(Preset::Demo);
    let (index, _) = simtrans_data::build_index(&config, 0).unwrap();
    let index = Arc::new(index);
    let loader = Loader::new(index.clone(), &config.data).unwrap();
    let ids: Vec<u32> = index.items_in(Split::BaseTrain)[..64]
        .iter()
        .map(|i| i.id)
        .collect();
    let batches: Vec<Vec<u32>> = ids.chunks(16).map(|c| c.to_vec()).collect();
    let dev = candle_core::Device::Cpu;
    // A consumer that takes its batches at once waits for every one of them to be built; one
    // that is slower than the producer finds them ready.
    let mut eager = loader.prefetch(batches.clone(), vec![1; 4], Augment::Train, 1, &dev);
    for b in &mut eager {
        b.unwrap();
    }
    let eager = eager.input_wait();
    let mut slow = loader.prefetch(batches, vec![1; 4], Augment::Train, 4, &dev);
    std::thread::sleep(std::time::Duration::from_millis(300));
    for b in &mut slow {
        b.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let slow = slow.input_wait();
    assert!(eager.waited_s <= eager.elapsed_s && slow.waited_s <= slow.elapsed_s);
    assert!(eager.share() > 0.5, "{eager:?}");
    assert!(slow.share() < eager.share(), "{slow:?} vs {eager:?}");
    assert!(slow.describe().contains("for decoded batches"));
}
