//! The reader against files torch itself wrote (`scripts/make-torch-fixtures.py`): every
//! tensor equal to what PyTorch's `state_dict()` held, names and dtypes included, in both file
//! formats; and every refusal the issue lists, with a seeded mutation loop for the rest.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use simtrans_pth::{read, read_bytes, Format, Layout, PthError};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Every tensor of the fixture equals PyTorch's state dict under `<stem>/`, and nothing is
/// missing or extra.
fn assert_matches_state_dict(file: &str) -> simtrans_pth::Checkpoint {
    let stem = file.trim_end_matches(".pth");
    let ckpt = read(&fixture(file)).unwrap();
    let want: HashMap<String, Tensor> = expected()
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&format!("{stem}/"))?.to_string(), v)))
        .filter(|(k, _)| k.contains('.'))
        .collect();
    assert!(!want.is_empty(), "no expected tensors for {stem}");
    let mut got_names: Vec<&String> = ckpt.tensors.keys().collect();
    let mut want_names: Vec<&String> = want.keys().collect();
    got_names.sort();
    want_names.sort();
    assert_eq!(got_names, want_names, "{file}: names");
    for (name, t) in &ckpt.tensors {
        let w = &want[name];
        assert_eq!(t.dtype(), w.dtype(), "{file}: {name} dtype");
        assert_eq!(t.dims(), w.dims(), "{file}: {name} shape");
        assert_eq!(values(t), values(w), "{file}: {name} values");
    }
    ckpt
}

#[test]
fn a_data_parallel_classifier_saved_on_gpus_reads_onto_the_cpu() {
    let ckpt = assert_matches_state_dict("classifier_whole.pth");
    assert_eq!(ckpt.format, Format::Zip);
    assert_eq!(ckpt.layout, Layout::WholeModule);
    let classes: Vec<(&str, &str)> = ckpt
        .modules
        .iter()
        .take(3)
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        classes,
        [
            ("", "torch.nn.parallel.data_parallel.DataParallel"),
            ("module", "GCN_reg.graph_modules.Net"),
            ("module.backbone", "torchvision.models.resnet.ResNet"),
        ]
    );
    assert!(ckpt.tensors["module.backbone.bn1.num_batches_tracked"].dtype() == DType::I64);
    assert_eq!(ckpt.sha256.len(), 64);
    // The file says its storages were on `cuda:0`.
    let bytes = std::fs::read(fixture("classifier_whole.pth")).unwrap();
    assert!(bytes.windows(6).any(|w| w == b"cuda:0"));
}

#[test]
fn state_dicts_read_alike_in_the_zip_and_the_legacy_format() {
    let zip = assert_matches_state_dict("classifier_params.pth");
    let legacy = assert_matches_state_dict("classifier_params_legacy.pth");
    assert_eq!((zip.format, legacy.format), (Format::Zip, Format::Legacy));
    assert_eq!(zip.layout, Layout::StateDict);
    assert!(zip.modules.is_empty());
    for (k, v) in &zip.tensors {
        assert_eq!(values(v), values(&legacy.tensors[k]), "{k}");
    }
    let whole = assert_matches_state_dict("backbone_step0.pth");
    let old = assert_matches_state_dict("backbone_step0_legacy.pth");
    assert_eq!(old.format, Format::Legacy);
    assert_eq!(old.layout, Layout::WholeModule);
    assert_eq!(whole.modules, old.modules);
    assert!(whole.tensors.contains_key("module.fc.weight"));
}

#[test]
fn simnets_and_the_discriminator_name_their_modules() {
    for file in ["simnet_head4.pth", "simnet_head2.pth"] {
        let ckpt = assert_matches_state_dict(file);
        assert_eq!(
            ckpt.modules[0].1, "ad_similarity.ad_modules.GANSimilarityNet",
            "{file}"
        );
        assert!(ckpt
            .modules
            .iter()
            .any(|(p, c)| p == "backbone.module" && c == "ad_similarity.ad_modules.Backbone"));
        // The trunk's deleted fc is not there.
        assert!(
            !ckpt.tensors.keys().any(|k| k.contains("resnet.fc")),
            "{file}"
        );
    }
    let disc = assert_matches_state_dict("domain_classifier.pth");
    assert!(disc.tensors.contains_key("module.bn.weight"));
}

#[test]
fn a_pickle_that_names_os_system_is_refused_by_name() {
    let err = read(&fixture("hostile_global.pth")).unwrap_err();
    let PthError::Disallowed { global, .. } = &err else {
        panic!("{err}")
    };
    assert!(global.ends_with(".system"), "{global}");
    assert!(err.to_string().contains("hostile_global.pth"), "{err}");
}

#[test]
fn files_that_are_not_models_are_refused() {
    let err = read(&fixture("not_a_model.pth")).unwrap_err();
    assert!(
        matches!(&err, PthError::NotAModel { found, .. } if found == "a dict with keys epoch, acc"),
        "{err}"
    );
    let err = read(&fixture("storage_too_short.pth")).unwrap_err();
    assert!(matches!(err, PthError::Storage { .. }), "{err}");
    assert!(err.to_string().contains("the pickle declares 256"), "{err}");
    let png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR";
    assert!(matches!(
        read_bytes(png, "x.png").unwrap_err(),
        PthError::NotACheckpoint { .. }
    ));
    assert!(matches!(
        read(&fixture("no such file.pth")).unwrap_err(),
        PthError::Io { .. }
    ));
}

#[test]
fn truncated_files_are_errors_at_every_cut() {
    for file in ["classifier_params.pth", "backbone_step0_legacy.pth"] {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let step = (bytes.len() / 97).max(1);
        for cut in (0..bytes.len()).step_by(step) {
            assert!(
                read_bytes(&bytes[..cut], file).is_err(),
                "{file} cut at {cut} of {} read",
                bytes.len()
            );
        }
    }
}

#[test]
fn random_damage_never_panics() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for file in ["backbone_step0_legacy.pth", "simnet_head4.pth"] {
        let clean = std::fs::read(fixture(file)).unwrap();
        let start = std::time::Instant::now();
        let mut refused = 0;
        for _ in 0..1500 {
            let mut bytes = clean.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            if rng.random_bool(0.1) {
                bytes.truncate(rng.random_range(0..bytes.len()));
            }
            // Ok or Err, never a panic; a damaged byte in a tensor's data still reads.
            refused += usize::from(read_bytes(&bytes, file).is_err());
        }
        assert!(refused > 0, "{file}: no damage was noticed");
        assert!(start.elapsed().as_secs() < 60, "{file}: too slow");
    }
}

/// A legacy-format file by hand: one state dict entry `w` viewing storage `0` (`numel` f32
/// declared) with `size` and `stride`, then the storage record: its element count `stored`,
/// followed by 4 floats whatever it says.
fn legacy_file(numel: u64, size: u64, stride: u64, stored: u64) -> Vec<u8> {
    let mut f = Vec::new();
    // The magic number, the protocol version and an empty sys-info dict, each a pickle.
    f.extend_from_slice(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.");
    f.extend_from_slice(b"\x80\x02M\xe9\x03.");
    f.extend_from_slice(b"\x80\x02}.");
    let long = |v: u64| {
        let mut b = vec![0x8a, 9];
        b.extend_from_slice(&v.to_le_bytes());
        b.push(0);
        b
    };
    let mut p = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    p.extend_from_slice(
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu",
    );
    p.extend_from_slice(&long(numel));
    p.extend_from_slice(b"NtQK\x00");
    p.extend_from_slice(&long(size));
    p.push(0x85);
    p.extend_from_slice(&long(stride));
    p.extend_from_slice(b"\x85\x89ccollections\nOrderedDict\n)RtRs.");
    f.extend_from_slice(&p);
    f.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
    f.extend_from_slice(&stored.to_le_bytes());
    for i in 0..4 {
        f.extend_from_slice(&(i as f32).to_le_bytes());
    }
    f
}

#[test]
fn declared_sizes_are_checked_before_anything_is_allocated() {
    // The hand-made file itself reads: a view of 3 of the 4 elements, stride 1.
    let ok = read_bytes(&legacy_file(4, 3, 1, 4), "ok.pt").unwrap();
    assert_eq!(ok.format, Format::Legacy);
    assert_eq!(
        ok.tensors["w"].to_vec1::<f32>().unwrap(),
        vec![0.0, 1.0, 2.0]
    );
    // A storage whose record declares 2^40 elements, of which the file holds 4.
    let err = read_bytes(&legacy_file(1 << 40, 3, 1, 1 << 40), "big.pt").unwrap_err();
    assert!(matches!(err, PthError::Truncated { .. }), "{err}");
    // The record says 4 elements but the pickle's storage claims 8.
    let err = read_bytes(&legacy_file(8, 3, 1, 4), "short.pt").unwrap_err();
    assert!(err.to_string().contains("declares 32"), "{err}");
    // A broadcast view (stride 0) claiming 2^40 elements of a 4-element storage.
    let err = read_bytes(&legacy_file(4, 1 << 40, 0, 4), "broadcast.pt").unwrap_err();
    assert!(err.to_string().contains("holds more elements"), "{err}");
    // A view reaching past its storage.
    let err = read_bytes(&legacy_file(4, 3, 2, 4), "past.pt").unwrap_err();
    assert!(err.to_string().contains("reaches past"), "{err}");
}

/// A legacy-format file whose object is the pickle `object` (no storages).
fn legacy_object(object: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.");
    f.extend_from_slice(b"\x80\x02M\xe9\x03.\x80\x02}.");
    f.extend_from_slice(object);
    f.extend_from_slice(b"\x80\x02].");
    f
}

#[test]
fn a_module_tree_shared_exponentially_is_refused_quickly() {
    // Level i is a Sequential whose children `a` and `b` are both level i − 1: 40 levels name
    // 2^40 modules, from a pickle of a few kilobytes.
    let mut p = b"\x80\x02ctorch.nn.modules.container\nSequential\nq\x00".to_vec();
    p.extend_from_slice(b"h\x00)\x81}br");
    p.extend_from_slice(&1u32.to_le_bytes());
    for level in 1..=40u32 {
        p.extend_from_slice(b"h\x00)\x81}X\x08\x00\x00\x00_modulesccollections\nOrderedDict\n)R(");
        for child in [b'a', b'b'] {
            p.extend_from_slice(&[b'X', 1, 0, 0, 0, child, b'j']);
            p.extend_from_slice(&level.to_le_bytes());
        }
        p.extend_from_slice(b"usbr");
        p.extend_from_slice(&(level + 1).to_le_bytes());
    }
    p.push(b'.');
    let start = std::time::Instant::now();
    let err = read_bytes(&legacy_object(&p), "shared.pt").unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");
    assert!(start.elapsed().as_secs() < 10);
}

#[test]
fn parameters_nested_in_parameters_are_not_tensors() {
    // `_rebuild_parameter` around `_rebuild_parameter` around … 3,000 deep (within the
    // parser's MARK bound): refused by the walk, not a stack overflow.
    let mut p = b"\x80\x02}X\x01\x00\x00\x00w".to_vec();
    let depth = 3_000;
    for _ in 0..depth {
        p.extend_from_slice(b"ctorch._utils\n_rebuild_parameter\n(");
    }
    p.push(b'N');
    for _ in 0..depth {
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend_from_slice(b"s.");
    let err = read_bytes(&legacy_object(&p), "nested.pt").unwrap_err();
    assert!(err.to_string().contains("nested 2 deep"), "{err}");
}
