//! vLLM's KV-cache event batches (`vllm/distributed/kv_events.py`) as msgpack, encoded and decoded.
//!
//! The simulator publishes these over ZMQ exactly as vLLM does, and the router's precise prefix index consumes them,
//! so both sides share this one codec. Wire shape (msgspec, `array_like=True`, `omit_defaults=True`, `tag=True`):
//! a batch is `[ts, [event, ..], data_parallel_rank]` and each event a tagged array:
//! `["BlockStored", block_hashes, parent_block_hash|nil, token_ids, block_size, lora_id, medium, lora_name,
//! extra_keys?, group_idx?]`, `["BlockRemoved", block_hashes, medium, group_idx?]`, `["AllBlocksCleared"]`; fields
//! that are trailing and at their default (`None`) are omitted. Newer vLLM drops `array_like`, so events arrive as maps
//! with the tag under `"type"`; the decoder accepts both. Hashes are ints (the low 64 bits of the 32-byte hash); a
//! 32-byte binary hash is reduced to its low 64 bits. Pure: no I/O.

use rmpv::Value;

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Blocks became full and hashed (and therefore findable by prefix lookup).
    BlockStored {
        /// Hash of each stored block, in chain order.
        block_hashes: Vec<u64>,
        /// Hash of the block before the first one, `None` at the start of a sequence.
        parent_block_hash: Option<u64>,
        /// Token ids of all stored blocks, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// Deprecated LoRA int id (vLLM keeps it for compatibility).
        lora_id: Option<i64>,
        /// Where the blocks live: `"GPU"` or `"CPU"`.
        medium: Option<String>,
        /// LoRA adapter name mixed into the hash, if any.
        lora_name: Option<String>,
        /// KV-cache group (hybrid models); `None` for the default group.
        group_idx: Option<u32>,
    },
    /// Cached blocks were evicted (reused for other content).
    BlockRemoved {
        /// Hashes of the evicted blocks.
        block_hashes: Vec<u64>,
        /// Where the blocks lived.
        medium: Option<String>,
        /// KV-cache group.
        group_idx: Option<u32>,
    },
    /// The whole prefix cache was reset.
    AllBlocksCleared,
}

/// One published batch: the events of one engine step.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// Wall-clock seconds (Unix) when the batch was made.
    pub ts: f64,
    /// Events in order.
    pub events: Vec<KvCacheEvent>,
    /// Data-parallel rank of the publishing engine (vLLM fills in 0 when unset).
    pub data_parallel_rank: Option<u32>,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvEventsError {
    /// Not valid msgpack.
    #[error("invalid msgpack: {0}")]
    Msgpack(String),
    /// Valid msgpack, wrong shape.
    #[error("unexpected shape: {0}")]
    Shape(String),
}

fn hashes(v: &[u64]) -> Value {
    Value::Array(v.iter().map(|&h| Value::from(h)).collect())
}

fn opt_str(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Nil, Value::from)
}

/// Drop trailing `Nil`s beyond the first `required` elements (msgspec `omit_defaults` on array-like structs).
fn trim_defaults(mut v: Vec<Value>, required: usize) -> Value {
    while v.len() > required && v.last().is_some_and(Value::is_nil) {
        v.pop();
    }
    Value::Array(v)
}

impl KvCacheEvent {
    fn to_value(&self) -> Value {
        match self {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                group_idx,
            } => trim_defaults(
                vec![
                    Value::from("BlockStored"),
                    hashes(block_hashes),
                    parent_block_hash.map_or(Value::Nil, Value::from),
                    Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                    Value::from(*block_size),
                    lora_id.map_or(Value::Nil, Value::from),
                    opt_str(medium),
                    opt_str(lora_name),
                    Value::Nil, // extra_keys
                    group_idx.map_or(Value::Nil, Value::from),
                ],
                8,
            ),
            KvCacheEvent::BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            } => trim_defaults(
                vec![
                    Value::from("BlockRemoved"),
                    hashes(block_hashes),
                    opt_str(medium),
                    group_idx.map_or(Value::Nil, Value::from),
                ],
                3,
            ),
            KvCacheEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
        }
    }
}

/// Encode a batch as vLLM's msgpack payload (array form).
pub fn encode_batch(batch: &KvEventBatch) -> Vec<u8> {
    let mut top = vec![
        Value::F64(batch.ts),
        Value::Array(batch.events.iter().map(KvCacheEvent::to_value).collect()),
    ];
    if let Some(r) = batch.data_parallel_rank {
        top.push(Value::from(r));
    }
    let mut out = Vec::with_capacity(64);
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &Value::Array(top));
    out
}

fn shape(msg: impl Into<String>) -> KvEventsError {
    KvEventsError::Shape(msg.into())
}

fn as_hash(v: &Value) -> Result<u64, KvEventsError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or_else(|| shape("hash int")),
        Value::Binary(b) if b.len() >= 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[b.len() - 8..]);
            Ok(u64::from_be_bytes(a))
        }
        other => Err(shape(format!("hash must be int or bytes, got {other}"))),
    }
}

fn as_hashes(v: &Value) -> Result<Vec<u64>, KvEventsError> {
    v.as_array()
        .ok_or_else(|| shape("block_hashes must be an array"))?
        .iter()
        .map(as_hash)
        .collect()
}

fn as_opt_hash(v: Option<&Value>) -> Result<Option<u64>, KvEventsError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(x) => as_hash(x).map(Some),
    }
}

fn as_opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn as_opt_u32(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
}

/// Fields of one event, by name, whichever form it came in.
struct Fields<'a> {
    tag: &'a str,
    positional: Option<&'a [Value]>,
    named: Option<&'a [(Value, Value)]>,
}

impl<'a> Fields<'a> {
    fn get(&self, pos: usize, name: &str) -> Option<&'a Value> {
        if let Some(p) = self.positional {
            return p.get(pos);
        }
        self.named?
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    }
}

fn decode_event(v: &Value) -> Result<KvCacheEvent, KvEventsError> {
    let f = match v {
        Value::Array(a) => {
            let tag = a
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| shape("event array without tag"))?;
            Fields {
                tag,
                positional: Some(&a[1..]),
                named: None,
            }
        }
        Value::Map(m) => {
            let tag = m
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str())
                .ok_or_else(|| shape("event map without \"type\""))?;
            Fields {
                tag,
                positional: None,
                named: Some(m),
            }
        }
        other => return Err(shape(format!("event must be array or map, got {other}"))),
    };
    match f.tag {
        "BlockStored" => {
            let block_hashes = as_hashes(
                f.get(0, "block_hashes")
                    .ok_or_else(|| shape("BlockStored.block_hashes"))?,
            )?;
            let parent_block_hash = as_opt_hash(f.get(1, "parent_block_hash"))?;
            let token_ids = f
                .get(2, "token_ids")
                .and_then(Value::as_array)
                .ok_or_else(|| shape("BlockStored.token_ids"))?
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| shape("token id"))
                })
                .collect::<Result<Vec<u32>, _>>()?;
            let block_size = as_opt_u32(f.get(3, "block_size"))
                .ok_or_else(|| shape("BlockStored.block_size"))?;
            Ok(KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id: f.get(4, "lora_id").and_then(Value::as_i64),
                medium: as_opt_str(f.get(5, "medium")),
                lora_name: as_opt_str(f.get(6, "lora_name")),
                group_idx: as_opt_u32(f.get(8, "group_idx")),
            })
        }
        "BlockRemoved" => Ok(KvCacheEvent::BlockRemoved {
            block_hashes: as_hashes(
                f.get(0, "block_hashes")
                    .ok_or_else(|| shape("BlockRemoved.block_hashes"))?,
            )?,
            medium: as_opt_str(f.get(1, "medium")),
            group_idx: as_opt_u32(f.get(2, "group_idx")),
        }),
        "AllBlocksCleared" => Ok(KvCacheEvent::AllBlocksCleared),
        other => Err(shape(format!("unknown event tag {other}"))),
    }
}

/// Decode a msgpack payload (array or map form) into a batch.
pub fn decode_batch(payload: &[u8]) -> Result<KvEventBatch, KvEventsError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).map_err(|e| KvEventsError::Msgpack(e.to_string()))?;
    let get = |pos: usize, name: &str| -> Option<&Value> {
        match &v {
            Value::Array(a) => a.get(pos),
            Value::Map(m) => m
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, x)| x),
            _ => None,
        }
    };
    let ts = match get(0, "ts") {
        Some(Value::F64(x)) => *x,
        Some(Value::F32(x)) => f64::from(*x),
        Some(Value::Integer(i)) => i.as_f64().unwrap_or(0.0),
        _ => return Err(shape("batch.ts")),
    };
    let events = get(1, "events")
        .and_then(Value::as_array)
        .ok_or_else(|| shape("batch.events"))?
        .iter()
        .map(decode_event)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KvEventBatch {
        ts,
        events,
        data_parallel_rank: as_opt_u32(get(2, "data_parallel_rank")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> KvCacheEvent {
        KvCacheEvent::BlockStored {
            block_hashes: vec![u64::MAX - 3, 7],
            parent_block_hash: None,
            token_ids: (0..32).collect(),
            block_size: 16,
            lora_id: None,
            medium: Some("GPU".into()),
            lora_name: None,
            group_idx: None,
        }
    }

    #[test]
    fn array_form_round_trips() {
        let b = KvEventBatch {
            ts: 1.5,
            events: vec![
                stored(),
                KvCacheEvent::BlockRemoved {
                    block_hashes: vec![9],
                    medium: Some("GPU".into()),
                    group_idx: None,
                },
                KvCacheEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        };
        assert_eq!(decode_batch(&encode_batch(&b)).unwrap(), b);
    }

    #[test]
    fn block_stored_is_positional_with_trailing_defaults_omitted() {
        let b = KvEventBatch {
            ts: 0.0,
            events: vec![stored()],
            data_parallel_rank: None,
        };
        let mut rd = &encode_batch(&b)[..];
        let v = rmpv::decode::read_value(&mut rd).unwrap();
        let top = v.as_array().unwrap();
        assert_eq!(top.len(), 2, "dp rank omitted when None");
        let ev = top[1].as_array().unwrap()[0].as_array().unwrap();
        assert_eq!(ev.len(), 8);
        assert_eq!(ev[0].as_str(), Some("BlockStored"));
        assert_eq!(ev[1].as_array().unwrap()[0].as_u64(), Some(u64::MAX - 3));
        assert!(ev[2].is_nil());
        assert_eq!(ev[4].as_u64(), Some(16));
        assert!(ev[5].is_nil());
        assert_eq!(ev[6].as_str(), Some("GPU"));
        assert!(ev[7].is_nil());
    }

    #[test]
    fn map_form_with_type_tag_is_accepted() {
        let ev = Value::Map(vec![
            (Value::from("type"), Value::from("BlockStored")),
            (
                Value::from("block_hashes"),
                Value::Array(vec![Value::Binary(
                    vec![0xaa; 24]
                        .into_iter()
                        .chain([0, 0, 0, 0, 0, 0, 1, 2])
                        .collect(),
                )]),
            ),
            (Value::from("parent_block_hash"), Value::from(5u64)),
            (
                Value::from("token_ids"),
                Value::Array(vec![Value::from(1u32); 16]),
            ),
            (Value::from("block_size"), Value::from(16u32)),
            (Value::from("medium"), Value::from("GPU")),
        ]);
        let batch = Value::Map(vec![
            (Value::from("ts"), Value::F64(2.0)),
            (
                Value::from("events"),
                Value::Array(vec![
                    ev,
                    Value::Map(vec![(Value::from("type"), Value::from("AllBlocksCleared"))]),
                ]),
            ),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &batch).unwrap();
        let d = decode_batch(&buf).unwrap();
        match &d.events[0] {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                ..
            } => {
                assert_eq!(block_hashes, &vec![0x0102]);
                assert_eq!(*parent_block_hash, Some(5));
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(d.events[1], KvCacheEvent::AllBlocksCleared);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_batch(&[0xc1]).is_err());
        assert!(decode_batch(&[0x93, 0x01, 0x02, 0x03]).is_err());
    }
}
