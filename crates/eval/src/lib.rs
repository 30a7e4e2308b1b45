//! Eval stage: how good the novel-class classifiers are, and the run's report.
//!
//! Per seed, the eval node measures every trained classifier variant on the clean novel test set
//! (top-1, per-class accuracy, confusion) and gathers what upstream stages measured (SimNet pair
//! F1, weight-vs-noise ROC-AUC, wall times) into a [`summary::SeedResult`]. Over seeds,
//! [`summary::summarise`] writes the stable `eval.json`, [`report::markdown`] the report and
//! [`figures`] its figures (PNG and SVG, drawn with plotters).

pub mod evidence;
pub mod figures;
pub mod metrics;
pub mod report;
pub mod stage;
pub mod stats;
pub mod summary;
