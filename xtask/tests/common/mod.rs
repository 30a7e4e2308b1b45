//! What the end-to-end tests share: a tiny demo configuration that keeps a whole run to seconds.

/// On top of the demo preset: a few images a class, a 4-wide network, few epochs.
pub const TINY: &[&str] = &[
    "--set=data.demo.base_train_per_class=24",
    "--set=data.demo.base_val_per_class=6",
    "--set=data.demo.web_per_class=20",
    "--set=data.demo.novel_test_per_class=8",
    "--set=backbone.small_width=4",
    "--set=backbone.batch_size=16",
    "--set=backbone.optim.epochs=3",
    "--set=simnet.optim.epochs=3",
    "--set=simnet.batch_a=12",
    "--set=simnet.batch_b=12",
    "--set=simnet.val_batches=1",
    "--set=simnet.val_classes=2",
    "--set=simnet.val_per_class=3",
    "--set=classifier.epochs_3a=2",
    "--set=classifier.epochs_3b=2",
    "--set=classifier.batch_size=8",
    "--set=classifier.graph_batch_size=16",
];
