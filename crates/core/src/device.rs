//! Device selection from the command line (`cpu`, `cuda`, `cuda:N`).

use crate::error::{CoreError, Result};
use candle_core::Device;

/// Parses a device name and opens the device.
pub fn parse(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match name {
                "cuda" => 0,
                _ => name
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        CoreError::Device(format!("`{name}` is not one of cpu, cuda, cuda:N"))
                    })?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(CoreError::Device(format!(
                    "`{name}` needs a build with `--features cuda` (see README, GPU build)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| CoreError::Device(format!("`{name}`: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert!(super::parse("gpu")
            .unwrap_err()
            .to_string()
            .contains("cpu, cuda"));
        assert!(super::parse("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(super::parse("cuda")
            .unwrap_err()
            .to_string()
            .contains("--features cuda"));
    }
}
