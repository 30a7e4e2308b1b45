//! Reading the one MATLAB file the Car layout needs (`make_model_name.mat`).
//!
//! CompCars ships its model-id → model-name table only as a MATLAB file. A reader for it is
//! not written yet; until then the error tells the user how to turn it into the text table
//! `model_names.txt` that the Car layout reads.

use std::path::Path;

/// The `model_names` cell array of CompCars' `make_model_name.mat`, by 1-based model id.
pub fn model_names(
    _path: &Path,
) -> std::result::Result<std::collections::HashMap<u32, String>, String> {
    Err("reading MATLAB .mat files is not implemented yet".into())
}
