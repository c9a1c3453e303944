//! KMS session encryption of a shell session (docs/protocol.md §7), pure: the 64-byte data key
//! the client had KMS generate, split as the agent splits it (bytes 0-31 encrypt what the agent
//! sends, 32-63 what the client sends), AES-256-GCM payloads as the agent frames them (a 12-byte
//! nonce, then the ciphertext and its tag; no additional data), and the answer to the agent's
//! encryption challenge.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

/// The data key's length: two AES-256 keys.
pub const DATA_KEY_BYTES: usize = 64;

/// A data key from KMS `GenerateDataKey`.
#[derive(Clone)]
pub struct DataKey {
    /// The key itself (64 bytes).
    pub plaintext: Vec<u8>,
    /// The key as KMS encrypted it, for the agent to decrypt.
    pub ciphertext_blob: Vec<u8>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("ciphertext_blob", &self.ciphertext_blob.len())
            .finish_non_exhaustive()
    }
}

/// Why a payload or the challenge could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KmsError {
    /// The data key is not 64 bytes.
    #[error("the KMS data key has {0} bytes, not 64")]
    KeyLength(usize),
    /// A payload did not decrypt (wrong key, damaged, or not encrypted).
    #[error("a payload did not decrypt with the session's data key")]
    Undecryptable,
    /// The challenge was not `{"Challenge": <base64>}`.
    #[error("the encryption challenge is malformed: {0}")]
    Challenge(String),
}

/// The challenge payloads (EncChallengeRequest, EncChallengeResponse).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Challenge {
    challenge: String,
}

/// The session's two keys and the nonce counter of what the client sends.
pub struct Cipher {
    /// Decrypts what the agent sends (data key bytes 0-31).
    from_agent: LessSafeKey,
    /// Encrypts what the client sends (bytes 32-63).
    to_agent: LessSafeKey,
    /// The next nonce: a 96-bit counter from a start the caller picks, never repeated under
    /// this key in one session.
    next_nonce: u128,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cipher").finish_non_exhaustive()
    }
}

fn key(bytes: &[u8]) -> Result<LessSafeKey, KmsError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| KmsError::KeyLength(bytes.len()))
}

impl Cipher {
    /// The keys of `data_key`; nonces count from `nonce_start`.
    pub fn new(data_key: &[u8], nonce_start: u128) -> Result<Self, KmsError> {
        if data_key.len() != DATA_KEY_BYTES {
            return Err(KmsError::KeyLength(data_key.len()));
        }
        Ok(Self {
            from_agent: key(&data_key[..32])?,
            to_agent: key(&data_key[32..])?,
            next_nonce: nonce_start,
        })
    }

    /// Encrypts a payload for the agent: nonce, ciphertext, tag.
    pub fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let counter = self.next_nonce & ((1 << 96) - 1);
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let mut nonce = [0; NONCE_LEN];
        nonce.copy_from_slice(&counter.to_be_bytes()[4..]);
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        // Sealing fails only for inputs beyond AES-GCM's limit (64 GiB).
        if self
            .to_agent
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .is_ok()
        {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Decrypts a payload from the agent.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, KmsError> {
        open_with(&self.from_agent, sealed)
    }

    /// The answer to the agent's EncChallengeRequest: its challenge decrypted with the agent's
    /// key and encrypted again with the client's, in the same JSON.
    pub fn answer_challenge(&mut self, request: &[u8]) -> Result<Vec<u8>, KmsError> {
        let challenge: Challenge =
            serde_json::from_slice(request).map_err(|e| KmsError::Challenge(e.to_string()))?;
        let sealed = STANDARD
            .decode(challenge.challenge)
            .map_err(|e| KmsError::Challenge(e.to_string()))?;
        let plain = self.open(&sealed)?;
        let answer = Challenge {
            challenge: STANDARD.encode(self.seal(&plain)),
        };
        Ok(serde_json::to_vec(&answer).unwrap_or_default())
    }
}

fn open_with(key: &LessSafeKey, sealed: &[u8]) -> Result<Vec<u8>, KmsError> {
    if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(KmsError::Undecryptable);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KmsError::Undecryptable)?;
    let mut body = body.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::empty(), &mut body)
        .map_err(|_| KmsError::Undecryptable)?;
    Ok(plain.to_vec())
}

/// The KMSEncryption action's result in the HandshakeResponse.
pub fn action_result(data_key: &DataKey) -> serde_json::Value {
    serde_json::json!({
        "KMSCipherTextKey": STANDARD.encode(&data_key.ciphertext_blob),
        "KMSCipherTextHash": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_key() -> Vec<u8> {
        (0..64).collect()
    }

    /// The agent's side, as its keys are: bytes 0-31 to send, 32-63 to receive.
    fn agent_seal(data_key: &[u8], nonce: [u8; 12], plaintext: &[u8]) -> Vec<u8> {
        let key = key(&data_key[..32]).expect("key");
        let mut body = plaintext.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .expect("seal");
        [nonce.as_slice(), &body].concat()
    }

    #[test]
    fn payloads_cross_with_the_halves_the_agent_uses() {
        let mut cipher = Cipher::new(&data_key(), 7).expect("cipher");
        let from_agent = agent_seal(&data_key(), [9; 12], b"$ ls\r\n");
        assert_eq!(cipher.open(&from_agent).expect("opens"), b"$ ls\r\n");
        let to_agent = cipher.seal(b"ls\r");
        assert_eq!(&to_agent[..12], &7u128.to_be_bytes()[4..]);
        let agent_key = key(&data_key()[32..]).expect("key");
        assert_eq!(open_with(&agent_key, &to_agent).expect("opens"), b"ls\r");
        // Nonces never repeat.
        assert_ne!(cipher.seal(b"x")[..12], cipher.seal(b"x")[..12]);
        // A damaged payload, or one sealed with the wrong half, does not open.
        let mut damaged = from_agent.clone();
        damaged[20] ^= 1;
        assert_eq!(cipher.open(&damaged), Err(KmsError::Undecryptable));
        assert_eq!(cipher.open(&to_agent), Err(KmsError::Undecryptable));
        assert_eq!(cipher.open(b"short"), Err(KmsError::Undecryptable));
        assert!(matches!(
            Cipher::new(&[0; 32], 0),
            Err(KmsError::KeyLength(32))
        ));
    }

    #[test]
    fn the_challenge_comes_back_under_the_clients_key() {
        let mut cipher = Cipher::new(&data_key(), 0).expect("cipher");
        let random = [42u8; 64];
        let request = serde_json::json!({"Challenge": STANDARD.encode(agent_seal(&data_key(), [1; 12], &random))});
        let answer = cipher
            .answer_challenge(request.to_string().as_bytes())
            .expect("answered");
        let answer: Challenge = serde_json::from_slice(&answer).expect("JSON");
        let sealed = STANDARD.decode(answer.challenge).expect("base64");
        let agent_key = key(&data_key()[32..]).expect("key");
        assert_eq!(open_with(&agent_key, &sealed).expect("opens"), random);
        assert!(matches!(
            cipher.answer_challenge(b"{}"),
            Err(KmsError::Challenge(_))
        ));
    }
}
