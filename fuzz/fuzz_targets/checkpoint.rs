//! The checkpoint reader of `sere-host`: `Checkpoint::from_bytes` and, on
//! whatever it accepts, the loaders that validate a checkpoint (`config`,
//! `check_values`, `training_config`, `meta_parse`, `tensor`, `read_tensor`).
//!
//! Two kinds of input, chosen by the first byte:
//! - odd: the rest of the input is the file, as is (length prefix, header,
//!   data all arbitrary);
//! - even: the rest is a list of edits applied to a small valid training
//!   checkpoint written once with `Checkpoint::save_atomic` (tensors, a
//!   negative-allowed moment, running variances, an empty tensor, step,
//!   format, the default config as TOML). The edits work on the parsed JSON
//!   header (dtype, shape, data offsets, metadata entries, config TOML
//!   lines, tensors removed / duplicated, raw JSON values), on the data
//!   (edge f32 values such as NaN, inf, negative variance) and then on the
//!   bytes (length prefix set or nudged, bytes flipped, inserted, cut,
//!   appended), so the fuzzer gets past the length prefix and the JSON
//!   parser into the safetensors and metadata checks.
//!
//! Properties: no panic anywhere (errors are fine); every tensor of an `Ok`
//! checkpoint has `data.len() == shape.product()`; `training_config` is
//! `Ok` exactly when both `config` and `check_values` are.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sere_fuzz::Num;
use sere_host::checkpoint::{formats, keys, meta, Checkpoint};
use sere_host::config::TrainConfig;
use serde_json::Value;

/// The bytes of the seed checkpoint, split into header JSON and data.
struct Seed {
    header: Value,
    data: Vec<u8>,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let mut c = Checkpoint::new();
        c.insert(
            format!("{}w", keys::STUDENT),
            &[2, 3],
            vec![0.5, -1.0, 2.0, 0.0, -0.0, 3.25],
        );
        c.insert(format!("{}w", keys::TEACHER), &[6], vec![1.0; 6]);
        c.insert(format!("{}w", keys::OPTIM_M), &[3, 2], vec![-0.5; 6]);
        c.insert(format!("{}w", keys::OPTIM_V), &[3, 2], vec![0.25; 6]);
        c.insert(
            keys::batch_norm("student", "0", "projection", "running_var"),
            &[2],
            vec![1.0, 2.0],
        );
        c.insert(keys::CENTRE, &[4], vec![0.0, 0.1, -0.1, 0.2]);
        c.insert("empty", &[0, 3], Vec::new());
        c.insert("scalar", &[], vec![7.0]);
        c.set_meta(meta::FORMAT, formats::TRAINING);
        c.set_meta(meta::STEP, 7);
        c.set_meta(meta::EPOCH, 1);
        c.set_meta(meta::SEED, 42);
        c.set_config(&TrainConfig::default());
        let dir = std::env::temp_dir().join(format!("sere-fuzz-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("seed.safetensors");
        c.save_atomic(&path).expect("save seed");
        let bytes = std::fs::read(&path).expect("read seed");
        let _ = std::fs::remove_dir_all(&dir);
        // The seed must itself load and validate.
        let back = Checkpoint::from_bytes(&bytes, &path).expect("seed loads");
        assert_eq!(back, c, "seed round trip");
        back.training_config().expect("seed validates");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).expect("seed header");
        Seed {
            header,
            data: bytes[8 + n..].to_vec(),
        }
    })
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F4", "f32", "", "F320",
];

const META_KEYS: &[&str] = &[
    meta::FORMAT,
    meta::VERSION,
    meta::STEP,
    meta::EPOCH,
    meta::SEED,
    meta::RNG,
    meta::CONFIG,
    "__metadata__",
];

#[derive(Arbitrary, Debug)]
enum MetaValue {
    Pick(u8),
    Text(String),
    Int(i64),
}

impl MetaValue {
    fn get(&self) -> String {
        const PICKS: &[&str] = &[
            formats::TRAINING,
            formats::BACKBONE,
            formats::CONTAINER,
            "1",
            "0",
            "2",
            "-1",
            "18446744073709551616",
            "",
            " 1",
            "NaN",
        ];
        match self {
            MetaValue::Pick(i) => PICKS[*i as usize % PICKS.len()].to_string(),
            MetaValue::Text(s) => s.clone(),
            MetaValue::Int(i) => i.to_string(),
        }
    }
}

/// A JSON value put where the reader expects something else.
#[derive(Arbitrary, Debug)]
enum RawJson {
    Null,
    Bool(bool),
    Num(i64),
    Big(u64),
    Float(f64),
    Str(String),
    EmptyArray,
    EmptyObject,
    Array(Vec<u64>),
}

impl RawJson {
    fn get(&self) -> Value {
        match self {
            RawJson::Null => Value::Null,
            RawJson::Bool(b) => Value::Bool(*b),
            RawJson::Num(n) => Value::from(*n),
            RawJson::Big(n) => Value::from(*n),
            RawJson::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            RawJson::Str(s) => Value::from(s.as_str()),
            RawJson::EmptyArray => Value::Array(Vec::new()),
            RawJson::EmptyObject => Value::Object(Default::default()),
            RawJson::Array(v) => Value::from(v.clone()),
        }
    }
}

/// A dimension or offset: usually small, sometimes huge.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    Small(u8),
    Any(u64),
    Edge(u8),
}

impl Size {
    fn get(self) -> u64 {
        const EDGES: &[u64] = &[
            0,
            1,
            u32::MAX as u64,
            1 << 32,
            1 << 62,
            u64::MAX / 4,
            u64::MAX / 4 + 1,
            u64::MAX - 1,
            u64::MAX,
            usize::MAX as u64 / 2,
        ];
        match self {
            Size::Small(n) => n as u64,
            Size::Any(n) => n,
            Size::Edge(i) => EDGES[i as usize % EDGES.len()],
        }
    }
}

#[derive(Arbitrary, Debug)]
enum HeaderEdit {
    Dtype { tensor: u8, dtype: u8 },
    Shape { tensor: u8, dims: Vec<Size> },
    Offsets { tensor: u8, start: Size, end: Size },
    OffsetsDelta { tensor: u8, start: i8, end: i8 },
    Remove { tensor: u8 },
    Duplicate { tensor: u8, name: String },
    Rename { tensor: u8, name: String },
    SetMeta { key: u8, value: MetaValue },
    SetMetaAnyKey { key: String, value: String },
    RemoveMeta { key: u8 },
    /// Replace line `line` of the stored TOML config.
    ConfigLine { line: u8, text: String },
    /// Cut the stored TOML config at a byte.
    ConfigCut { at: u16 },
    /// A field of a tensor entry (or the entry itself) as a raw JSON value.
    TensorRaw { tensor: u8, field: u8, value: RawJson },
    /// A metadata value (or the whole `__metadata__`) as a raw JSON value.
    MetaRaw { key: u8, value: RawJson },
    /// An extra field in a tensor entry.
    TensorExtra { tensor: u8, key: String },
}

#[derive(Arbitrary, Debug)]
enum DataEdit {
    Value { index: u16, value: Num },
    Byte { index: u16, xor: u8 },
}

#[derive(Arbitrary, Debug)]
enum ByteEdit {
    SetLen(u64),
    LenDelta(i8),
    Flip { pos: u32, xor: u8 },
    Insert { pos: u32, bytes: Vec<u8> },
    Truncate { len: u32 },
    Append(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Edits {
    header: Vec<HeaderEdit>,
    /// Pretty-print the JSON (whitespace, key order kept).
    pretty: bool,
    /// Pad the header with spaces to 8 bytes, as the writer does.
    pad: bool,
    data: Vec<DataEdit>,
    bytes: Vec<ByteEdit>,
}

/// The `i`-th tensor entry (not `__metadata__`) of the header, if any.
fn tensor_key(h: &serde_json::Map<String, Value>, i: u8) -> Option<String> {
    let names: Vec<&String> = h.keys().filter(|k| *k != "__metadata__").collect();
    if names.is_empty() {
        return None;
    }
    Some(names[i as usize % names.len()].clone())
}

fn meta_key(i: u8) -> &'static str {
    META_KEYS[i as usize % META_KEYS.len()]
}

fn apply_header(h: &mut serde_json::Map<String, Value>, e: &HeaderEdit) {
    let entry = |h: &mut serde_json::Map<String, Value>, t: u8| -> Option<serde_json::Map<String, Value>> {
        let k = tensor_key(h, t)?;
        h.get(&k).and_then(Value::as_object).cloned()
    };
    let put = |h: &mut serde_json::Map<String, Value>, t: u8, v: serde_json::Map<String, Value>| {
        if let Some(k) = tensor_key(h, t) {
            h.insert(k, Value::Object(v));
        }
    };
    match e {
        HeaderEdit::Dtype { tensor, dtype } => {
            if let Some(mut o) = entry(h, *tensor) {
                o.insert("dtype".into(), DTYPES[*dtype as usize % DTYPES.len()].into());
                put(h, *tensor, o);
            }
        }
        HeaderEdit::Shape { tensor, dims } => {
            if let Some(mut o) = entry(h, *tensor) {
                let dims: Vec<u64> = dims.iter().take(8).map(|d| d.get()).collect();
                o.insert("shape".into(), dims.into());
                put(h, *tensor, o);
            }
        }
        HeaderEdit::Offsets { tensor, start, end } => {
            if let Some(mut o) = entry(h, *tensor) {
                o.insert("data_offsets".into(), vec![start.get(), end.get()].into());
                put(h, *tensor, o);
            }
        }
        HeaderEdit::OffsetsDelta { tensor, start, end } => {
            if let Some(mut o) = entry(h, *tensor) {
                let get = |i: usize| {
                    o.get("data_offsets")
                        .and_then(|v| v.get(i))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                let s = get(0).wrapping_add_signed(*start as i64);
                let en = get(1).wrapping_add_signed(*end as i64);
                o.insert("data_offsets".into(), vec![s, en].into());
                put(h, *tensor, o);
            }
        }
        HeaderEdit::Remove { tensor } => {
            if let Some(k) = tensor_key(h, *tensor) {
                h.remove(&k);
            }
        }
        HeaderEdit::Duplicate { tensor, name } => {
            if let Some(o) = entry(h, *tensor) {
                h.insert(name.clone(), Value::Object(o));
            }
        }
        HeaderEdit::Rename { tensor, name } => {
            if let Some(k) = tensor_key(h, *tensor) {
                if let Some(v) = h.remove(&k) {
                    h.insert(name.clone(), v);
                }
            }
        }
        HeaderEdit::SetMeta { key, value } => {
            meta_obj(h).insert(meta_key(*key).into(), value.get().into());
        }
        HeaderEdit::SetMetaAnyKey { key, value } => {
            meta_obj(h).insert(key.clone(), value.clone().into());
        }
        HeaderEdit::RemoveMeta { key } => {
            meta_obj(h).remove(meta_key(*key));
        }
        HeaderEdit::ConfigLine { line, text } => {
            let m = meta_obj(h);
            if let Some(cfg) = m.get(meta::CONFIG).and_then(Value::as_str) {
                let mut lines: Vec<String> = cfg.lines().map(str::to_string).collect();
                if !lines.is_empty() {
                    let i = *line as usize % lines.len();
                    lines[i] = text.clone();
                }
                m.insert(meta::CONFIG.into(), lines.join("\n").into());
            }
        }
        HeaderEdit::ConfigCut { at } => {
            let m = meta_obj(h);
            if let Some(cfg) = m.get(meta::CONFIG).and_then(Value::as_str) {
                let mut at = (*at as usize).min(cfg.len());
                while !cfg.is_char_boundary(at) {
                    at -= 1;
                }
                let cut = cfg[..at].to_string();
                m.insert(meta::CONFIG.into(), cut.into());
            }
        }
        HeaderEdit::TensorRaw { tensor, field, value } => {
            if let Some(k) = tensor_key(h, *tensor) {
                const FIELDS: &[&str] = &["dtype", "shape", "data_offsets"];
                let f = *field as usize % (FIELDS.len() + 1);
                if f == FIELDS.len() {
                    h.insert(k, value.get());
                } else if let Some(Value::Object(o)) = h.get_mut(&k) {
                    o.insert(FIELDS[f].into(), value.get());
                }
            }
        }
        HeaderEdit::MetaRaw { key, value } => {
            let k = meta_key(*key);
            if k == "__metadata__" {
                h.insert(k.into(), value.get());
            } else {
                meta_obj(h).insert(k.into(), value.get());
            }
        }
        HeaderEdit::TensorExtra { tensor, key } => {
            if let Some(k) = tensor_key(h, *tensor) {
                if let Some(Value::Object(o)) = h.get_mut(&k) {
                    o.insert(key.clone(), Value::from(0));
                }
            }
        }
    }
}

/// `__metadata__` as an object (made one if it is missing or not one).
fn meta_obj(h: &mut serde_json::Map<String, Value>) -> &mut serde_json::Map<String, Value> {
    let m = h
        .entry("__metadata__")
        .or_insert_with(|| Value::Object(Default::default()));
    if !m.is_object() {
        *m = Value::Object(Default::default());
    }
    m.as_object_mut().unwrap()
}

fn build(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let edits = Edits::arbitrary(u)?;
    let seed = seed();
    let mut header = seed.header.clone();
    if let Value::Object(h) = &mut header {
        for e in edits.header.iter().take(16) {
            apply_header(h, e);
        }
    }
    let mut json = if edits.pretty {
        serde_json::to_vec_pretty(&header).unwrap()
    } else {
        serde_json::to_vec(&header).unwrap()
    };
    if edits.pad {
        json.resize(json.len().next_multiple_of(8), b' ');
    }
    let mut data = seed.data.clone();
    for e in edits.data.iter().take(16) {
        match e {
            DataEdit::Value { index, value } => {
                let n = data.len() / 4;
                if n > 0 {
                    let i = *index as usize % n * 4;
                    data[i..i + 4].copy_from_slice(&value.get().to_le_bytes());
                }
            }
            DataEdit::Byte { index, xor } => {
                if !data.is_empty() {
                    let i = *index as usize % data.len();
                    data[i] ^= xor;
                }
            }
        }
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + data.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    for e in edits.bytes.iter().take(8) {
        match e {
            ByteEdit::SetLen(n) => {
                if bytes.len() >= 8 {
                    bytes[..8].copy_from_slice(&n.to_le_bytes());
                }
            }
            ByteEdit::LenDelta(d) => {
                if bytes.len() >= 8 {
                    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                    bytes[..8].copy_from_slice(&n.wrapping_add_signed(*d as i64).to_le_bytes());
                }
            }
            ByteEdit::Flip { pos, xor } => {
                if !bytes.is_empty() {
                    let i = *pos as usize % bytes.len();
                    bytes[i] ^= xor;
                }
            }
            ByteEdit::Insert { pos, bytes: b } => {
                let i = *pos as usize % (bytes.len() + 1);
                bytes.splice(i..i, b.iter().copied().take(64));
            }
            ByteEdit::Truncate { len } => bytes.truncate(*len as usize),
            ByteEdit::Append(b) => bytes.extend(b.iter().copied().take(64)),
        }
    }
    Ok(bytes)
}

fn check(bytes: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let Ok(c) = Checkpoint::from_bytes(bytes, path) else {
        return;
    };
    for (name, (shape, data)) in &c.tensors {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(
            n,
            Some(data.len()),
            "tensor `{name}`: shape {shape:?} but {} values",
            data.len()
        );
        let (s, d) = c.tensor(name).expect("listed tensor");
        assert!(s == shape.as_slice() && std::ptr::eq(d, data.as_slice()));
        let mut out = vec![0.0f32; data.len()];
        c.read_tensor(name, shape, &mut out).expect("own shape");
        assert!(out
            .iter()
            .zip(data)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let _ = c.meta_parse::<u64>(meta::STEP);
    let _ = c.meta_parse::<u32>(meta::EPOCH);
    let cfg = c.config();
    let values = c.check_values();
    let train = c.training_config();
    assert_eq!(
        train.is_ok(),
        cfg.is_ok() && values.is_ok(),
        "training_config {train:?} vs config {cfg:?} / check_values {values:?}"
    );
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        check(rest);
    } else if let Ok(bytes) = build(&mut Unstructured::new(rest)) {
        check(&bytes);
    }
});
