//! KMS session encryption as the agent does it (`agent/session/crypto/blockcipher.go`), pure:
//! the 64-byte data key split in two (bytes 0-31 encrypt what the agent sends, 32-63 decrypt
//! what the client sends), AES-256-GCM payloads framed as a 12-byte nonce (a counter from a
//! random start) before the ciphertext and tag, and the challenge (64 random bytes) of
//! EncChallengeRequest and EncChallengeResponse. Written apart from the bridge's, as the rest
//! of the emulator is: an independent oracle.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The agent's two keys of one session.
pub(crate) struct AgentCipher {
    to_client: LessSafeKey,
    from_client: LessSafeKey,
    next_nonce: u128,
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    // The system's random source does not fail on Linux.
    let _ = SystemRandom::new().fill(&mut bytes);
    bytes
}

/// The KMSEncryption action's `Challenge`: base64 of 16 random bytes.
pub(crate) fn handshake_challenge() -> String {
    STANDARD.encode(random::<16>())
}

impl AgentCipher {
    /// The keys of a decrypted data key.
    pub(crate) fn new(data_key: &[u8]) -> Result<Self, String> {
        if data_key.len() != 64 {
            return Err(format!("the data key has {} bytes, not 64", data_key.len()));
        }
        let key = |bytes: &[u8]| {
            UnboundKey::new(&AES_256_GCM, bytes)
                .map(LessSafeKey::new)
                .map_err(|_| "not an AES-256 key".to_owned())
        };
        let start: [u8; 12] = random();
        let mut counter = [0; 16];
        counter[4..].copy_from_slice(&start);
        Ok(Self {
            to_client: key(&data_key[..32])?,
            from_client: key(&data_key[32..])?,
            next_nonce: u128::from_be_bytes(counter),
        })
    }

    /// A payload for the client.
    pub(crate) fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0; 12];
        nonce.copy_from_slice(&self.next_nonce.to_be_bytes()[4..]);
        self.next_nonce = (self.next_nonce + 1) & ((1 << 96) - 1);
        let mut body = plaintext.to_vec();
        let _ = self.to_client.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut body,
        );
        [nonce.as_slice(), &body].concat()
    }

    /// A payload from the client.
    pub(crate) fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 + 16 {
            return None;
        }
        let (nonce, body) = sealed.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .from_client
            .open_in_place(nonce, Aad::empty(), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }

    /// A new challenge: the random bytes, and the EncChallengeRequest payload that carries
    /// them encrypted.
    pub(crate) fn challenge(&mut self) -> (Vec<u8>, Vec<u8>) {
        let secret = random::<64>().to_vec();
        let payload = serde_json::json!({"Challenge": STANDARD.encode(self.seal(&secret))});
        (secret, payload.to_string().into_bytes())
    }

    /// Whether an EncChallengeResponse carries `secret`, encrypted with the client's key.
    pub(crate) fn answers(&self, secret: &[u8], response: &[u8]) -> Result<(), String> {
        let value: serde_json::Value = serde_json::from_slice(response)
            .map_err(|e| format!("EncChallengeResponse is not JSON: {e}"))?;
        let sealed = value
            .get("Challenge")
            .and_then(serde_json::Value::as_str)
            .and_then(|c| STANDARD.decode(c).ok())
            .ok_or("EncChallengeResponse has no base64 Challenge")?;
        match self.open(&sealed) {
            Some(plain) if plain == secret => Ok(()),
            Some(_) => Err("Encryption challenge does not match!".to_owned()),
            None => Err("EncChallengeResponse does not decrypt with the client's key".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_reads_the_other_with_its_own_half() {
        let data_key: Vec<u8> = (100..164).collect();
        let mut agent = AgentCipher::new(&data_key).expect("cipher");
        // The client's view: the halves swapped.
        let swapped: Vec<u8> = [&data_key[32..], &data_key[..32]].concat();
        let mut client = AgentCipher::new(&swapped).expect("cipher");
        assert_eq!(
            client.open(&agent.seal(b"prompt$ ")),
            Some(b"prompt$ ".to_vec())
        );
        assert_eq!(agent.open(&client.seal(b"ls\r")), Some(b"ls\r".to_vec()));
        let own = agent.seal(b"own");
        assert_eq!(agent.open(&own), None);
        let (secret, request) = agent.challenge();
        let sealed: serde_json::Value = serde_json::from_slice(&request).expect("JSON");
        let sealed = STANDARD
            .decode(sealed["Challenge"].as_str().expect("challenge"))
            .expect("base64");
        let plain = client.open(&sealed).expect("the client reads it");
        let answer = serde_json::json!({"Challenge": STANDARD.encode(client.seal(&plain))});
        assert_eq!(
            agent.answers(&secret, answer.to_string().as_bytes()),
            Ok(())
        );
        let wrong = serde_json::json!({"Challenge": STANDARD.encode(client.seal(b"other"))});
        assert_eq!(
            agent.answers(&secret, wrong.to_string().as_bytes()),
            Err("Encryption challenge does not match!".to_owned())
        );
        assert!(AgentCipher::new(&[0; 32]).is_err());
    }
}
