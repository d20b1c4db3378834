//! A long conversation's answers do not depend on what else runs: ten greedy turns, each
//! resending the growing history (the earlier turns from the prefix cache, the new one
//! prefilled in chunks beside other requests' decoding), give the same text on a server
//! of their own and on one serving seven other such conversations at once (with its
//! step budget set by a step-time target).

use crate::common::{self, post, start, wait_ready};
use chorus_server::config::Config;
use serde_json::{json, Value};

const TURNS: usize = 10;

async fn converse(url: &str, topic: &str) -> Vec<String> {
    let mut messages: Vec<Value> = Vec::new();
    let mut answers = Vec::new();
    for turn in 0..TURNS {
        messages.push(json!({
            "role": "user",
            "content": format!("{topic} Part {turn}: tell me more, with details and examples."),
        }));
        let body = json!({
            "messages": messages,
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": true,
        });
        let (status, reply) = post(url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "turn {turn}: {reply}");
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        messages.push(json!({"role": "assistant", "content": text}));
        answers.push(text);
    }
    answers
}

#[tokio::test]
async fn a_ten_turn_conversation_answers_the_same_alone_and_among_seven_others() {
    let _turn = common::together().await;
    let topic = "Let us talk about the history of Norway.";
    let alone_url = start(Config::defaults());
    wait_ready(&alone_url).await;
    let alone = converse(&alone_url, topic).await;

    // The busy server budgets steps by time (`--max-step-ms`), so its chunks change size
    // from step to step with what the steps cost: the answers must not.
    let busy_url = start(Config {
        max_step_ms: 100,
        ..Config::defaults()
    });
    wait_ready(&busy_url).await;
    let others: Vec<_> = (0..7)
        .map(|i| {
            let url = busy_url.clone();
            tokio::spawn(async move {
                converse(
                    &url,
                    &format!("Conversation {i}: describe a city you like."),
                )
                .await
            })
        })
        .collect();
    let together = converse(&busy_url, topic).await;
    for other in others {
        assert_eq!(other.await.expect("conversation").len(), TURNS);
    }
    for (turn, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "turn {turn} differs alone and among others");
    }
}
