//! `weir sim --tokenizer FILE`: with the `hf` feature the pod counts `/tokenize` ids with that `tokenizer.json`;
//! without it the flag fails at start-up naming the feature.

mod common;

#[cfg(feature = "hf")]
use common::{MODEL, Weir, post_json};
#[cfg(feature = "hf")]
use serde_json::{Value, json};

/// A word-level `tokenizer.json` (written by hand, as `tokenizers` saves it): five words, `[UNK]` = 0, and Llama-3's
/// special tokens as added tokens right after
/// them (ids 6..=10: `tokenizers` numbers added tokens on from the model's vocabulary, as in Llama-3's file).
fn tiny_tokenizer_file(tag: &str) -> std::path::PathBuf {
    let special = |id: u32, s: &str| {
        format!(
            r#"{{"id":{id},"content":"{s}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
        )
    };
    let added = [
        special(6, "<|begin_of_text|>"),
        special(7, "<|end_of_text|>"),
        special(8, "<|start_header_id|>"),
        special(9, "<|end_header_id|>"),
        special(10, "<|eot_id|>"),
    ]
    .join(",");
    let json = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{added}],"normalizer":null,
"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
"model":{{"type":"WordLevel","vocab":{{"[UNK]":0,"hello":1,"world":2,"user":3,"assistant":4,"gpu":5}},"unk_token":"[UNK]"}}}}"#
    );
    let dir = std::env::temp_dir().join(format!("weir-tok-e2e-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).expect("write tokenizer.json");
    path
}

#[cfg(not(feature = "hf"))]
#[tokio::test]
async fn tokenizer_flag_without_feature_names_it() {
    let path = tiny_tokenizer_file("nofeat");
    let out = common::run_weir(
        &["sim", "--port", "0", "--tokenizer", path.to_str().unwrap()],
        std::time::Duration::from_secs(60),
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`hf` cargo feature"), "{err}");
}

#[cfg(feature = "hf")]
#[tokio::test]
async fn tokenize_counts_with_the_tokenizer_file() {
    let path = tiny_tokenizer_file("hf");
    let w = Weir::sim(&["--tokenizer", path.to_str().unwrap()]).await;
    let url = format!("{}/tokenize", w.url());
    let tokenize = |body: Value| {
        let url = url.clone();
        async move {
            let (status, text) = post_json(&url, &body, &[]).await;
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            (status, v)
        }
    };
    let (status, body) =
        tokenize(json!({"model": MODEL, "prompt": "hello world gpu zebra hello"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 5, "{body}");
    assert_eq!(body["tokens"], json!([1, 2, 5, 0, 1]), "{body}");
    let (status, body) =
        tokenize(json!({"model": MODEL, "messages": [{"role": "user", "content": "hello gpu"}]}))
            .await;
    assert_eq!(status, 200, "{body}");
    // <|begin_of_text|><|start_header_id|>user<|end_header_id|> hello gpu <|eot_id|> + assistant header.
    assert_eq!(
        body["tokens"],
        json!([6, 8, 3, 9, 1, 5, 10, 8, 4, 9]),
        "{body}"
    );
}
