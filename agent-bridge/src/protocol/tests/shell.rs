//! Shell sessions (`Config::shell`): Size payloads, ^D at the end of local input, no flags, and
//! KMS encryption with the halves of the data key the agent uses.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::*;
use crate::protocol::kms::{Cipher, DataKey};

fn shell() -> Pair {
    Pair::new(Config {
        shell: true,
        ..Config::default()
    })
}

#[test]
fn a_shell_sends_sizes_types_end_of_file_and_never_a_flag() {
    let mut p = shell();
    // No handshake: the first Output opens the session.
    let prompt = p.agent.send(PayloadType::Output, b"$ ");
    p.deliver(&prompt).unwrap();
    p.drain_events();
    p.session.send_terminal_size(p.now, 132, 43).unwrap();
    p.session.handle_local_data(b"exit").unwrap();
    p.session.disconnect_local(p.now).unwrap();
    let sent = p.transmit().data;
    let kinds: Vec<PayloadType> = sent.iter().map(|m| m.payload_type).collect();
    assert_eq!(kinds, [PayloadType::Size, PayloadType::Output]);
    assert_eq!(&sent[0].payload[..], br#"{"cols":132,"rows":43}"#);
    assert_eq!(&sent[1].payload[..], b"exit\x04");
    // Leaving sends no flag (the shell plugin ignores flags): the session closes at once.
    p.session.terminate(p.now);
    assert!(p.transmit().data.is_empty());
    p.drain_events();
    assert_eq!(p.closed().map(|c| c.0), Some(CloseCause::LocalTerminate));
    // A Port session has no terminal.
    let mut port = Pair::new(Config::default());
    port.basic_open();
    assert_eq!(
        port.session.send_terminal_size(port.now, 80, 24),
        Err(SessionError::NotShell)
    );
}

#[test]
fn kms_encryption_uses_the_halves_the_agent_uses() {
    let mut p = shell();
    let request = serde_json::json!({
        "AgentVersion": "3.3.1345.0",
        "RequestedClientActions": [
            {"ActionType": "SessionType", "ActionParameters": {"SessionType": "Standard_Stream", "Properties": null}},
            {"ActionType": "KMSEncryption", "ActionParameters": {"KMSKeyId": "alias/sessions", "Challenge": "AAAA"}},
        ]
    });
    let frame = p.agent.send(
        PayloadType::HandshakeRequest,
        request.to_string().as_bytes(),
    );
    p.deliver(&frame).unwrap();
    // The response waits for the data key.
    assert!(p.transmit().data.is_empty());
    assert_eq!(
        p.drain_events(),
        [Event::DataKeyRequired {
            key_id: "alias/sessions".into()
        }]
    );
    let data_key: Vec<u8> = (0..64).collect();
    p.session.provide_data_key(
        p.now,
        Ok(DataKey {
            plaintext: data_key.clone(),
            ciphertext_blob: b"blob".to_vec(),
        }),
    );
    let sent = p.transmit().data;
    let response: HandshakeResponse = serde_json::from_slice(&sent[0].payload).unwrap();
    let kms = &response.processed_client_actions[1];
    assert_eq!(
        (kms.action_type.as_str(), kms.action_status),
        ("KMSEncryption", 1)
    );
    assert_eq!(
        kms.action_result["KMSCipherTextKey"],
        STANDARD.encode(b"blob")
    );
    p.ack_all(&sent);
    // The agent's view of the key: it sends with bytes 0-31 and reads with 32-63.
    let swapped = [&data_key[32..], &data_key[..32]].concat();
    let mut agent = Cipher::new(&swapped, 1 << 40).unwrap();
    let secret = [7u8; 64];
    let challenge = serde_json::json!({"Challenge": STANDARD.encode(agent.seal(&secret))});
    let frame = p.agent.send(
        PayloadType::EncChallengeRequest,
        challenge.to_string().as_bytes(),
    );
    p.deliver(&frame).unwrap();
    let sent = p.transmit().data;
    assert_eq!(sent[0].payload_type, PayloadType::EncChallengeResponse);
    let answer: serde_json::Value = serde_json::from_slice(&sent[0].payload).unwrap();
    let sealed = STANDARD
        .decode(answer["Challenge"].as_str().unwrap())
        .unwrap();
    assert_eq!(agent.open(&sealed).unwrap(), secret);
    p.ack_all(&sent);
    let complete = p.agent.handshake_complete();
    p.deliver(&complete).unwrap();
    p.drain_events();
    // Output both ways is encrypted; Size is not.
    let output = p.agent.send(PayloadType::Output, &agent.seal(b"$ "));
    p.deliver(&output).unwrap();
    assert!(
        p.drain_events()
            .contains(&Event::Data(Bytes::from_static(b"$ ")))
    );
    p.session.handle_local_data(b"ls\r").unwrap();
    p.session.send_terminal_size(p.now, 80, 24).unwrap();
    let sent = p.transmit().data;
    assert_eq!(agent.open(&sent[0].payload).unwrap(), b"ls\r");
    assert_eq!(&sent[1].payload[..], br#"{"cols":80,"rows":24}"#);
    // Output that does not decrypt ends the session.
    let forged = p.agent.send(PayloadType::Output, b"plain text, not sealed");
    p.deliver(&forged).unwrap();
    p.drain_events();
    assert!(matches!(p.closed(), Some((CloseCause::Encryption(_), _))));
}

#[test]
fn a_key_that_cannot_be_had_fails_the_action_with_the_reason() {
    let mut p = shell();
    let request = serde_json::json!({
        "AgentVersion": "3.3.1345.0",
        "RequestedClientActions": [
            {"ActionType": "SessionType", "ActionParameters": {"SessionType": "Standard_Stream", "Properties": null}},
            {"ActionType": "KMSEncryption", "ActionParameters": {"KMSKeyId": "k", "Challenge": "AAAA"}},
        ]
    });
    let frame = p.agent.send(
        PayloadType::HandshakeRequest,
        request.to_string().as_bytes(),
    );
    p.deliver(&frame).unwrap();
    p.drain_events();
    p.session
        .provide_data_key(p.now, Err("AccessDeniedException: not yours".into()));
    let sent = p.transmit().data;
    let response: HandshakeResponse = serde_json::from_slice(&sent[0].payload).unwrap();
    let kms = &response.processed_client_actions[1];
    assert_eq!(kms.action_status, 2);
    assert_eq!(kms.error, "AccessDeniedException: not yours");
}
