//! The server over real HTTP on a loopback port: answers equal the engine's own, requests
//! under different policies in flight together each get their solo answer, every bad
//! request gets its status and an OpenAI-style error while others are served, a cancelled
//! stream frees its KV, a full queue answers 429, and shutdown finishes what is in flight.

mod common;

use std::time::Duration;

use common::{Server, body, data_lines, data_url, scenes, streamed_text};
use ecache_core::PolicyConfig;
use ecache_engine::{ImageInput, Message, Part, Request, Role};
use serde_json::{Value, json};

const DESCRIBE: &str = ecache_demo::language::DESCRIBE;

/// The engine's own answer to the same chat request (greedy).
fn direct(
    server: &Server,
    png: &[u8],
    question: &str,
    max: usize,
    kv: Option<PolicyConfig>,
) -> String {
    let mut r = Request::chat(vec![Message {
        role: Role::User,
        parts: vec![
            Part::Image(ImageInput::Bytes {
                data: png.to_vec(),
                name: "scene.png".into(),
            }),
            Part::Text(question.into()),
        ],
    }]);
    r.max_new_tokens = max;
    r.policy = kv;
    server.engine.generate(r).unwrap().text
}

fn elastic() -> Value {
    json!({"policy": "elastic", "budget": 0.2, "params": {"protected_tail": 10}})
}

fn elastic_config() -> PolicyConfig {
    let mut p = PolicyConfig::new("elastic", 0.2);
    p.set_param("protected_tail", "10").unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_whole_and_streamed_equal_the_engines() {
    let server = Server::start(|_| {}, |_| {}).await;
    let png = &scenes(1)[0];
    let engine_answer = {
        let png = png.clone();
        let s = &server;
        tokio::task::block_in_place(|| direct(s, &png, DESCRIBE, 48, None))
    };
    let (status, whole) = server.chat(&body(png, DESCRIBE, 48)).await;
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, engine_answer);
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], "ecache-demo");
    let usage = &whole["usage"];
    assert_eq!(usage["prompt_tokens"], 92);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(92 + usage["completion_tokens"].as_u64().unwrap())
    );

    let mut streaming = body(png, DESCRIBE, 48);
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let events = server.stream(&streaming).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (text, finish) = streamed_text(&events);
    assert_eq!(text, engine_answer);
    assert_eq!(finish.as_deref(), Some("stop"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"], *usage);

    // Under a policy of its own, and with the length limit.
    let mut limited = body(png, DESCRIBE, 5);
    limited["kv_cache"] = elastic();
    let (status, answer) = server.chat(&limited).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 5);
    let engine_answer =
        tokio::task::block_in_place(|| direct(&server, png, DESCRIBE, 5, Some(elastic_config())));
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        engine_answer.as_str()
    );

    let models: Value = server
        .client
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "ecache-demo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_requests_with_mixed_policies_get_their_solo_answers() {
    let server = Server::start(|c| c.max_batch = 8, |_| {}).await;
    let pngs = scenes(8);
    let policies = [
        json!(null),
        elastic(),
        json!({"policy": "h2o", "budget": 0.3}),
        json!({"policy": "local", "budget": 0.5}),
    ];
    let questions = [DESCRIBE, "how many objects are there ?"];
    let request = |i: usize| {
        let mut b = body(&pngs[i], questions[i % 2], 40);
        if !policies[i % 4].is_null() {
            b["kv_cache"] = policies[i % 4].clone();
        }
        if i.is_multiple_of(3) {
            b["stream"] = json!(true);
        }
        b
    };
    let together: Vec<String> = futures_util::future::join_all((0..8).map(|i| {
        let server = &server;
        let b = request(i);
        async move {
            if b["stream"] == json!(true) {
                streamed_text(&server.stream(&b).await).0
            } else {
                let (status, v) = server.chat(&b).await;
                assert_eq!(status, 200, "{v}");
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        }
    }))
    .await;
    assert!(server.engine.stats().peak_active > 1, "they ran together");
    for (i, answer) in together.iter().enumerate() {
        let mut b = request(i);
        b["stream"] = json!(false);
        let (_, solo) = server.chat(&b).await;
        assert_eq!(
            answer,
            solo["choices"][0]["message"]["content"].as_str().unwrap(),
            "request {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_an_error_and_others_are_served() {
    let server = Server::start(
        |c| c.kv_memory = Some(1 << 20),
        |s| {
            s.max_body = 256 << 10;
            s.api_key = Some("sesame".into());
        },
    )
    .await;
    let png = &scenes(1)[0];
    let post = |payload: reqwest::Body, key: Option<&str>| {
        let mut r = server
            .client
            .post(format!("{}/v1/chat/completions", server.url))
            .header("content-type", "application/json")
            .body(payload);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send()
    };
    let check = |status: u16, param: Option<&str>, needle: &str| {
        let needle = needle.to_string();
        let param = param.map(str::to_string);
        move |(got, v): (u16, Value)| {
            assert_eq!(got, status, "{needle}: {v}");
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains(&needle), "{needle}: {v}");
            assert!(v["error"]["type"].is_string(), "{v}");
            if let Some(p) = &param {
                assert_eq!(v["error"]["param"], p.as_str(), "{v}");
            }
        }
    };
    let send = |value: Value| {
        let text = value.to_string();
        async move {
            let r = post(text.into(), Some("sesame")).await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let good = body(png, "how many objects are there ?", 8);
    let with = |key: &str, value: Value| {
        let mut b = good.clone();
        b[key] = value;
        b
    };
    let huge = png_claiming(200_000, 200_000);
    let wide = png_claiming(9000, 100);
    let image_body = |url: String| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "how many ?"}]}]})
    };
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (
            json!({"messages": []}),
            400,
            Some("messages"),
            "no messages",
        ),
        (json!({"model": "ecache-demo"}), 400, None, "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            400,
            Some("messages"),
            "role `tool`",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            400,
            Some("messages"),
            "no content",
        ),
        (
            image_body("data:image/png;base64,AAAA".into()),
            400,
            Some("messages"),
            "neither a PNG nor a JPEG",
        ),
        (
            image_body("https://example.com/cat.png".into()),
            400,
            Some("messages"),
            "not fetched",
        ),
        (
            image_body(data_url(&png[..200])),
            400,
            Some("messages"),
            "not a readable image",
        ),
        (
            image_body(data_url(&wide)),
            400,
            Some("messages"),
            "9000 x 100 pixels, over the limit of 8192",
        ),
        (
            image_body(data_url(&huge)),
            400,
            Some("messages"),
            "over the limit",
        ),
        (
            with("kv_cache", json!({"policy": "nope", "budget": 0.5})),
            400,
            Some("kv_cache"),
            "unknown policy `nope`",
        ),
        (
            with(
                "kv_cache",
                json!({"policy": "elastic", "budget": 0.2, "params": {"colour": 3}}),
            ),
            400,
            Some("kv_cache"),
            "colour",
        ),
        (
            with("kv_cache", json!({"policy": "h2o", "budget": 1.5})),
            400,
            Some("kv_cache"),
            "outside (0, 1]",
        ),
        (
            with("kv_cache", json!({"policy": "h2o", "budget": 0.0})),
            400,
            Some("kv_cache"),
            "outside (0, 1]",
        ),
        (
            with("kv_cache", json!({"policy": "h2o"})),
            400,
            Some("kv_cache"),
            "budget is needed",
        ),
        (
            with("max_tokens", json!(1000)),
            400,
            Some("max_tokens"),
            "context of 512",
        ),
        (
            with("max_completion_tokens", json!(300)),
            400,
            Some("max_completion_tokens"),
            "more than the cap",
        ),
        (
            with("max_tokens", json!(0)),
            400,
            Some("max_tokens"),
            "at least 1",
        ),
        (
            with("temperature", json!(3.0)),
            400,
            Some("temperature"),
            "outside [0, 2]",
        ),
        (with("top_p", json!(0.0)), 400, Some("top_p"), "(0, 1]"),
        (with("n", json!(2)), 400, Some("n"), "n = 1"),
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(600)}]}),
            400,
            Some("messages"),
            "context of 512",
        ),
        (
            with("model", json!("gpt-4o")),
            404,
            Some("model"),
            "does not exist",
        ),
    ];
    for (payload, status, param, needle) in cases {
        check(status, param, needle)(send(payload).await);
    }
    // Malformed JSON, and a body over --max-body.
    let r = post("{\"messages\": [".into(), Some("sesame"))
        .await
        .unwrap();
    let status = r.status().as_u16();
    check(400, None, "not a chat completion request")((status, r.json().await.unwrap()));
    let big = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "x".repeat(300 << 10)
    );
    let r = post(big.into(), Some("sesame")).await.unwrap();
    let status = r.status().as_u16();
    check(413, None, "length limit")((status, r.json().await.unwrap()));
    // Keys.
    for key in [None, Some("wrong")] {
        let r = post(good.to_string().into(), key).await.unwrap();
        let status = r.status().as_u16();
        check(401, None, "API key")((status, r.json().await.unwrap()));
    }
    // The server still answers, and nothing was left behind.
    let (status, v) = send(good.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(server.metric("ecache_active_sequences").await, 0.0);
    assert_eq!(server.metric("ecache_queue_length").await, 0.0);
}

/// A long streamed request that has sent its first token.
async fn running(server: &Server, png: &[u8], max: usize) -> reqwest::Response {
    let mut b = body(png, DESCRIBE, max);
    b["stream"] = json!(true);
    b["ignore_eos"] = json!(true);
    let mut r = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 2 {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_kv() {
    let server = Server::start(|_| {}, |_| {}).await;
    let png = &scenes(1)[0];
    let stream = running(&server, png, 400).await;
    assert!(server.metric("ecache_kv_reserved_bytes").await > 0.0);
    assert_eq!(server.metric("ecache_active_sequences").await, 1.0);
    drop(stream);
    server.wait_metric("ecache_active_sequences", 0.0).await;
    assert_eq!(server.metric("ecache_kv_reserved_bytes").await, 0.0);
    assert_eq!(server.metric("ecache_kv_in_use_bytes").await, 0.0);
    let cancelled = server.engine.stats().cancelled;
    assert_eq!(cancelled, 1);
    let (status, _) = server
        .chat(&body(png, "how many objects are there ?", 8))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429() {
    let pngs = scenes(3);
    // The cap holds one request of 300 new tokens; one more may wait.
    let per = 4096 * (92 + 300);
    let server = Server::start(
        |c| {
            c.kv_memory = Some(per);
            c.max_queue = 1;
        },
        |_| {},
    )
    .await;
    let first = running(&server, &pngs[0], 300).await;
    let waiting = {
        let client = server.client.clone();
        let url = format!("{}/v1/chat/completions", server.url);
        let b = body(&pngs[1], DESCRIBE, 300);
        tokio::spawn(async move { client.post(url).json(&b).send().await.unwrap().status() })
    };
    server.wait_metric("ecache_queue_length", 1.0).await;
    let (status, v) = server.chat(&body(&pngs[2], DESCRIBE, 300)).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    drop(first);
    assert_eq!(waiting.await.unwrap().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_refuses_new_ones() {
    let mut server = Server::start(|_| {}, |s| s.shutdown_grace = Duration::from_secs(60)).await;
    let png = &scenes(1)[0];
    let mut stream = running(&server, png, 120).await;
    server.shut_down();
    // The request in flight runs to its end.
    let mut rest = String::new();
    while let Some(bytes) = stream.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&bytes));
    }
    let events = data_lines(&rest);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&events).1.as_deref(), Some("length"));
    // The server has stopped: its task ends and a new request gets no answer.
    tokio::time::timeout(Duration::from_secs(30), &mut server.done)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap();
    let refused = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&body(png, DESCRIBE, 8))
        .send()
        .await;
    assert!(refused.is_err(), "nothing listens any more");
    assert!(!server.engine.accepting());
}

/// A PNG whose (valid) header claims `w x h` RGB pixels and that holds no pixel data.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (
            &b"IHDR"[..],
            [&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat(),
        ),
        (
            &b"IDAT"[..],
            vec![0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ),
        (&b"IEND"[..], Vec::new()),
    ] {
        out.extend((data.len() as u32).to_be_bytes());
        let chunk = [kind, &data].concat();
        out.extend(&chunk);
        out.extend(crc32(&chunk).to_be_bytes());
    }
    out
}
