//! SimNet, step 1 of SimTrans: a network that says whether two images show the same category.
//!
//! It is trained on pairs of clean base images (where "same category" is known) while an
//! adversarial discriminator pushes its pair representation to look alike on base pairs and on
//! pairs of novel web images, so that the similarity transfers to the novel categories. The
//! later stages use it frozen, to score how similar each web image is to the others of its
//! category. See `SPEC.md` step 1 for the reference behaviour this crate follows.
//!
//! Modules: [`pairs`] (the reference's pair enumeration, kept as the definition), [`head`]
//! (similarity heads and the discriminator, with the factorised first layer), [`train`] (the
//! losses and the adversarial step in the reference's update order), [`model`] (the trained
//! network as later stages load it: [`SimNet::load`], [`SimNet::similarity_matrix`]) and
//! [`stage`] (the training loop, validation, checkpoints; [`run`] is step 1).

pub mod bench;
pub mod head;
pub mod import;
pub mod model;
pub mod pairs;
pub mod stage;
pub mod train;

pub use model::{from_reference, schema, SimNet, SimNetShape};
pub use stage::run;

/// Errors of the SimNet stage.
#[derive(Debug, thiserror::Error)]
pub enum SimnetError {
    /// Shared plumbing (artifacts, config, checkpoints, divergence).
    #[error(transparent)]
    Core(#[from] simtrans_core::CoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The backbone crate failed (weights, artifact).
    #[error(transparent)]
    Backbone(#[from] simtrans_backbone::BackboneError),
    /// The data crate failed (index, images).
    #[error(transparent)]
    Data(#[from] simtrans_data::DataError),
    /// A `simnet` artifact or checkpoint does not hold what this version needs.
    #[error("simnet artifact: {0}")]
    Artifact(String),
    /// The configuration asks for something this stage cannot do.
    #[error("simnet config: {0}")]
    Config(String),
}

/// Result with [`SimnetError`].
pub type Result<T> = std::result::Result<T, SimnetError>;
