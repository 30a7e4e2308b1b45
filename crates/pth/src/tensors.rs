//! From the parsed object to named tensors: torch's tensor records, and the walk over a pickled
//! module tree that names them as `state_dict()` does.
//!
//! A tensor is the record `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)`
//! (a Parameter wraps one in `_rebuild_parameter`); its storage is the persistent id
//! `('storage', torch.FloatStorage, key, location, numel)`. A module is an object of an allowed
//! class whose BUILD state holds `_parameters`, `_buffers` and `_modules`, each an OrderedDict.
//! Locations (`cuda:0` …) are ignored: every tensor comes to the CPU.

use crate::container::Storages;
use crate::error::{PthError, Result};
use crate::pickle::{Node, Pickle, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Deepest module nesting walked (a ResNet-50 under DataParallel is five levels).
pub const MAX_DEPTH: usize = 64;

/// Most modules a walk visits (a ResNet-50 has about 150; a module object listed under many
/// names, as a hostile pickle can nest it, would otherwise be walked exponentially often).
pub const MAX_MODULES: usize = 100_000;

/// The candle dtype and element size of a torch storage class, by its name.
pub fn storage_dtype(class: &str) -> Option<(DType, usize)> {
    Some(match class {
        "FloatStorage" => (DType::F32, 4),
        "DoubleStorage" => (DType::F64, 8),
        "HalfStorage" => (DType::F16, 2),
        "BFloat16Storage" => (DType::BF16, 2),
        "LongStorage" => (DType::I64, 8),
        "IntStorage" => (DType::I32, 4),
        "ShortStorage" => (DType::I16, 2),
        "ByteStorage" | "BoolStorage" => (DType::U8, 1),
        _ => return None,
    })
}

/// What the walk found.
pub struct Found {
    pub whole_module: bool,
    pub modules: Vec<(String, String)>,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Turns a checkpoint's object into named tensors, reading their storages.
pub fn collect(pickle: &Pickle, storages: &mut Storages<'_>, file: &str) -> Result<Found> {
    let mut w = Walker {
        p: pickle,
        storages,
        file,
        loaded: HashMap::new(),
    };
    w.root()
}

struct Walker<'p, 's, 'a> {
    p: &'p Pickle,
    storages: &'s mut Storages<'a>,
    file: &'p str,
    /// Storages read so far, by key (tensors may share one).
    loaded: HashMap<String, (DType, Vec<u8>)>,
}

impl Walker<'_, '_, '_> {
    fn not_a_model(&self, found: String) -> PthError {
        PthError::NotAModel {
            file: self.file.into(),
            found,
        }
    }

    fn malformed(&self, what: impl Into<String>) -> PthError {
        PthError::Pickle {
            file: self.file.into(),
            offset: 0,
            what: what.into(),
        }
    }

    fn root(&mut self) -> Result<Found> {
        let root = self.p.root.clone();
        if let Some(class) = self.module_class(&root) {
            let mut found = Found {
                whole_module: true,
                modules: Vec::new(),
                tensors: BTreeMap::new(),
            };
            self.module(&root, class, "", 0, &mut found)?;
            return Ok(found);
        }
        let entries = self.dict_entries(&root).ok_or_else(|| {
            let what = self.describe(&root);
            self.not_a_model(what)
        })?;
        // A training checkpoint's dict with the weights under `state_dict`.
        if let Some((_, inner)) = entries
            .iter()
            .find(|(k, _)| *k == Value::Str("state_dict".into()))
        {
            if self.dict_entries(inner).is_some() {
                return self.state_dict(inner);
            }
        }
        self.state_dict(&root)
    }

    fn state_dict(&mut self, v: &Value) -> Result<Found> {
        let entries = self.dict_entries(v).unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (k, value) in &entries {
            let (Value::Str(name), true) = (k, self.is_tensor(value)) else {
                let what = self.describe(v);
                return Err(self.not_a_model(what));
            };
            tensors.insert(name.clone(), self.tensor(value)?);
        }
        if tensors.is_empty() {
            return Err(self.not_a_model("an empty dict".into()));
        }
        Ok(Found {
            whole_module: false,
            modules: Vec::new(),
            tensors,
        })
    }

    /// `a dict with keys epoch, acc`, `a list`, `an int`: what the file holds, for errors.
    fn describe(&self, v: &Value) -> String {
        match (v, self.p.node(v)) {
            (_, Some(Node::Dict(items))) | (_, Some(Node::Object { items, .. }))
                if self.dict_entries(v).is_some() =>
            {
                let keys: Vec<String> = items
                    .iter()
                    .take(8)
                    .map(|(k, _)| match k {
                        Value::Str(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .collect();
                format!("a dict with keys {}", keys.join(", "))
            }
            (_, Some(Node::List(_))) => "a list".into(),
            (_, Some(Node::Tuple(_))) => "a tuple".into(),
            (_, Some(Node::Object { callable, .. })) => match self.p.node(callable) {
                Some(Node::Global { module, name }) => format!("an object of {module}.{name}"),
                _ => "an object".into(),
            },
            (Value::Int(_), _) => "an int".into(),
            (Value::Str(_), _) => "a string".into(),
            _ => "something else".into(),
        }
    }

    /// The entries of a dict or an OrderedDict.
    fn dict_entries(&self, v: &Value) -> Option<Vec<(Value, Value)>> {
        match self.p.node(v)? {
            Node::Dict(items) => Some(items.clone()),
            Node::Object {
                callable, items, ..
            } if self.global_is(callable, "collections", "OrderedDict") => Some(items.clone()),
            _ => None,
        }
    }

    fn global_is(&self, v: &Value, module: &str, name: &str) -> bool {
        matches!(self.p.node(v), Some(Node::Global { module: m, name: n }) if m == module && n == name)
    }

    fn global_name(&self, v: &Value) -> Option<(&str, &str)> {
        match self.p.node(v)? {
            Node::Global { module, name } => Some((module, name)),
            // The legacy format pickles module classes as ('module', cls, file, source).
            Node::PersId(pid) => match self.p.node(pid)? {
                Node::Tuple(t) if t.first() == Some(&Value::Str("module".into())) => {
                    self.global_name(t.get(1)?)
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// `module.Class` of an object that is a torch module (its class an allowed module class).
    fn module_class(&self, v: &Value) -> Option<String> {
        let Some(Node::Object { callable, .. }) = self.p.node(v) else {
            return None;
        };
        let (module, name) = self.global_name(callable)?;
        crate::is_module_class(module, name).then(|| format!("{module}.{name}"))
    }

    fn state_field(&self, v: &Value, field: &str) -> Option<Value> {
        let Some(Node::Object {
            state: Some(state), ..
        }) = self.p.node(v)
        else {
            return None;
        };
        let entries = self.dict_entries(state)?;
        entries
            .into_iter()
            .find(|(k, _)| *k == Value::Str(field.into()))
            .map(|(_, v)| v)
    }

    fn module(
        &mut self,
        v: &Value,
        class: String,
        prefix: &str,
        depth: usize,
        found: &mut Found,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.malformed("modules nested deeper than any model"));
        }
        if found.modules.len() >= MAX_MODULES {
            return Err(self.malformed(format!("more than {MAX_MODULES} modules")));
        }
        found
            .modules
            .push((prefix.trim_end_matches('.').to_string(), class));
        let non_persistent: BTreeSet<String> = self
            .state_field(v, "_non_persistent_buffers_set")
            .map(|s| self.set_strings(&s))
            .unwrap_or_default();
        for field in ["_parameters", "_buffers"] {
            let Some(dict) = self.state_field(v, field) else {
                continue;
            };
            for (k, t) in self.dict_entries(&dict).unwrap_or_default() {
                let Value::Str(name) = k else {
                    return Err(self.malformed(format!("a {field} key is not a string")));
                };
                if t == Value::None || (field == "_buffers" && non_persistent.contains(&name)) {
                    continue;
                }
                let tensor = self.tensor(&t)?;
                found.tensors.insert(format!("{prefix}{name}"), tensor);
            }
        }
        if let Some(children) = self.state_field(v, "_modules") {
            for (k, child) in self.dict_entries(&children).unwrap_or_default() {
                let Value::Str(name) = k else {
                    return Err(self.malformed("a _modules key is not a string"));
                };
                if child == Value::None {
                    continue;
                }
                let Some(class) = self.module_class(&child) else {
                    let what = self.describe(&child);
                    return Err(
                        self.not_a_model(format!("a module child `{prefix}{name}` that is {what}"))
                    );
                };
                self.module(&child, class, &format!("{prefix}{name}."), depth + 1, found)?;
            }
        }
        Ok(())
    }

    fn set_strings(&self, v: &Value) -> BTreeSet<String> {
        let items = match self.p.node(v) {
            Some(Node::Set(items)) => items.clone(),
            // builtins.set([...]) in protocol 2.
            Some(Node::Object { args, .. }) => match self.p.node(args) {
                Some(Node::Tuple(a)) => match a.first().and_then(|l| self.p.node(l)) {
                    Some(Node::List(items)) => items.clone(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        items
            .into_iter()
            .filter_map(|i| match i {
                Value::Str(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The tensor record `v` is, if it is one: `(which, args)`.
    fn rebuild(&self, v: &Value) -> Option<(&str, Vec<Value>)> {
        let Some(Node::Object { callable, args, .. }) = self.p.node(v) else {
            return None;
        };
        let which = match self.global_name(callable)? {
            ("torch._utils", name) => name,
            // torch 0.4 pickled a parameter as `Parameter(data, requires_grad)`.
            ("torch.nn.parameter", "Parameter") => "_rebuild_parameter",
            _ => return None,
        };
        match self.p.node(args)? {
            Node::Tuple(a) => Some((which, a.clone())),
            _ => None,
        }
    }

    fn is_tensor(&self, v: &Value) -> bool {
        self.rebuild(v).is_some_and(|(name, _)| {
            matches!(
                name,
                "_rebuild_tensor_v2"
                    | "_rebuild_tensor"
                    | "_rebuild_parameter"
                    | "_rebuild_parameter_with_state"
            )
        })
    }

    fn tensor(&mut self, v: &Value) -> Result<Tensor> {
        self.tensor_at(v, 0)
    }

    /// A tensor record, `depth` parameters deep (a parameter wraps one tensor; a pickle that
    /// nests them further is not a checkpoint).
    fn tensor_at(&mut self, v: &Value, depth: usize) -> Result<Tensor> {
        let Some((name, args)) = self.rebuild(v) else {
            let what = self.describe(v);
            return Err(self.malformed(format!("expected a tensor, found {what}")));
        };
        match name {
            "_rebuild_parameter" | "_rebuild_parameter_with_state" if depth < 2 => {
                let inner = args
                    .first()
                    .cloned()
                    .ok_or_else(|| self.malformed("a parameter without its data"))?;
                self.tensor_at(&inner, depth + 1)
            }
            "_rebuild_tensor_v2" | "_rebuild_tensor" => self.view(&args),
            other => Err(self.malformed(format!(
                "`{other}` nested {depth} deep is not a tensor record"
            ))),
        }
    }

    /// `storage, offset, size, stride` → the tensor (a copy of the viewed elements).
    fn view(&mut self, args: &[Value]) -> Result<Tensor> {
        let [storage, Value::Int(offset), size, stride, ..] = args else {
            return Err(self.malformed("a tensor record without storage, offset, size and stride"));
        };
        let size = self.ints(size)?;
        let stride = self.ints(stride)?;
        if size.len() != stride.len() || *offset < 0 {
            return Err(self.malformed("a tensor whose size and stride disagree"));
        }
        let (key, dtype, numel) = self.storage_of(storage)?;
        let elem = dtype.size_in_bytes();
        if !self.loaded.contains_key(&key) {
            let bytes = numel
                .checked_mul(elem)
                .ok_or_else(|| self.storage_error(&key, "its size overflows"))?;
            let data = self.storages.read(&key, bytes)?;
            self.loaded.insert(key.clone(), (dtype, data));
        }
        let (stored, data) = &self.loaded[&key];
        if *stored != dtype {
            return Err(self.storage_error(&key, "two tensors read it as different types"));
        }
        // Each element of the view is copied out, so a view may not hold more elements than
        // its storage (a broadcast view would let a few bytes claim terabytes).
        let count = size
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
            .filter(|&c| c <= numel)
            .ok_or_else(|| {
                self.storage_error(
                    &key,
                    &format!("a view of size {size:?} holds more elements than its {numel}"),
                )
            })?;
        let offset = *offset as usize;
        // The last element the view touches must lie inside the storage.
        if count > 0 {
            let last = size.iter().zip(&stride).try_fold(offset, |acc, (&s, &st)| {
                acc.checked_add((s - 1).checked_mul(st)?)
            });
            if last.is_none_or(|l| l >= numel) {
                return Err(self.storage_error(
                    &key,
                    &format!("a view (offset {offset}, size {size:?}, stride {stride:?}) reaches past its {numel} elements"),
                ));
            }
        }
        let mut out = Vec::with_capacity(count * elem);
        let mut index = vec![0usize; size.len()];
        for _ in 0..count {
            let at = offset + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&data[at * elem..(at + 1) * elem]);
            for d in (0..size.len()).rev() {
                index[d] += 1;
                if index[d] < size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Tensor::from_raw_buffer(&out, dtype, &size, &Device::Cpu).map_err(|error| {
            PthError::Candle {
                file: self.file.into(),
                error,
            }
        })
    }

    fn storage_error(&self, key: &str, what: &str) -> PthError {
        PthError::Storage {
            file: self.file.into(),
            key: key.into(),
            what: what.into(),
        }
    }

    fn ints(&self, v: &Value) -> Result<Vec<usize>> {
        let items = match self.p.node(v) {
            Some(Node::Tuple(t)) | Some(Node::List(t)) => t.clone(),
            // torch.Size(...) records.
            Some(Node::Object { args, .. }) => match self.p.node(args) {
                Some(Node::Tuple(a)) => match a.first().and_then(|x| self.p.node(x)) {
                    Some(Node::Tuple(t)) | Some(Node::List(t)) => t.clone(),
                    _ => return Err(self.malformed("a tensor size that is not a tuple")),
                },
                _ => return Err(self.malformed("a tensor size that is not a tuple")),
            },
            _ => return Err(self.malformed("a tensor size that is not a tuple")),
        };
        items
            .iter()
            .map(|i| match i {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err(self.malformed("a tensor size or stride that is not a count")),
            })
            .collect()
    }

    /// `('storage', torch.FloatStorage, key, location, numel)` → key, dtype, numel.
    fn storage_of(&self, v: &Value) -> Result<(String, DType, usize)> {
        let Some(Node::PersId(pid)) = self.p.node(v) else {
            return Err(self.malformed("a tensor whose storage is not a persistent id"));
        };
        let Some(Node::Tuple(t)) = self.p.node(pid) else {
            return Err(self.malformed("a storage id that is not a tuple"));
        };
        let (Some(Value::Str(kind)), Some(ty), Some(key), Some(Value::Int(numel))) =
            (t.first(), t.get(1), t.get(2), t.get(4))
        else {
            return Err(self.malformed("a storage id without type, key and size"));
        };
        if kind != "storage" || *numel < 0 {
            return Err(self.malformed(format!("a persistent id of kind `{kind}`")));
        }
        let key = match key {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => return Err(self.malformed("a storage key that is not a string")),
        };
        let class = self
            .global_name(ty)
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
        let (dtype, _) = storage_dtype(&class).ok_or_else(|| {
            self.storage_error(
                &key,
                &format!("storage type `{class}` is not one this reader knows"),
            )
        })?;
        Ok((key, dtype, *numel as usize))
    }
}
