//! The simtrans-rs orchestrator as a library: the CLI definition, the stage graph walk, and the
//! dispatch to the stage crates. `main.rs` is a thin shell around it so that the walk can be
//! tested with fake stages.

pub mod cli;
pub mod import;
pub mod pipeline;
pub mod smoke;
pub mod stages;
