//! The server on a tiny Qwen2-VL checkpoint: OpenAI chat messages (a system turn, a
//! picture between texts, an earlier answer, a follow-up) become the prompt transformers'
//! chat template renders for them; the image pad is reserved text.

mod common;

use std::path::PathBuf;

use common::{Server, data_url};
use ecache_engine::{ImageInput, Request};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The first conversation of expected_chat.json as OpenAI messages answers exactly as the
/// engine answers transformers' rendering of it (a prompt already in the model's format,
/// used as given) with the same picture; its prompt takes the rendering's tokens with the
/// image pad expanded to the picture's 8. A message holding `<|image_pad|>` as text gets a
/// 400 naming `messages`, and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_become_the_template_transformers_renders() {
    let dir = fixtures().join("tiny-qwen2-vl");
    let picture = fixtures().join("qwen2-vl-images/wide.png");
    let png = std::fs::read(&picture).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_chat.json")).unwrap())
            .unwrap();
    let chat = &expected["chats"][0];
    let messages: Vec<Value> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let parts: Vec<Value> = m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "image" => json!({"type": "image_url", "image_url": {"url": data_url(&png)}}),
                    _ => p.clone(),
                })
                .collect();
            json!({"role": m["role"], "content": parts})
        })
        .collect();
    let server = Server::start_on(dir.clone(), |_| {}, |_| {}).await;
    let request = json!({"model": "tiny-qwen2-vl", "messages": messages, "max_tokens": 6});
    let (status, answer) = server.chat(&request).await;
    assert_eq!(status, 200, "{answer}");

    let rendered = chat["text"].as_str().unwrap();
    let frontend = ecache_model::load_frontend(&dir, Default::default()).unwrap();
    let pads = frontend.tokenizer().encode(rendered, false).unwrap().len();
    assert_eq!(answer["usage"]["prompt_tokens"], pads - 1 + 8, "{answer}");
    let direct = {
        let engine = server.engine.clone();
        let rendered = rendered.to_string();
        tokio::task::spawn_blocking(move || {
            let mut r = Request::text(rendered);
            r.image = Some(ImageInput::Path(picture));
            r.max_new_tokens = 6;
            engine.generate(r).unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        direct.text.as_str()
    );
    assert_eq!(
        answer["usage"]["completion_tokens"],
        direct.tokens.len() as u64
    );

    let mut reserved = request.clone();
    reserved["messages"][3]["content"][0]["text"] = json!("<|image_pad|> ?");
    let (status, error) = server.chat(&reserved).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "messages", "{error}");
    let (status, again) = server.chat(&request).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["choices"][0]["message"]["content"],
        answer["choices"][0]["message"]["content"]
    );
}
