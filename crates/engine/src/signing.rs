//! Standard Webhooks signatures.
//!
//! Every attempt carries `webhook-id`, `webhook-timestamp` and `webhook-signature`. The signature
//! is `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`, keyed with the raw
//! bytes behind an endpoint's `whsec_<base64>` secret. During a secret rotation every valid
//! secret signs, and the header holds one `v1,` entry per secret, space-separated, newest first.
//!
//! ```
//! use herald_engine::signing::{sign, verify, Secret};
//!
//! let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
//! let header = sign(&[&secret], "msg_1", 1_614_265_330, br#"{"a":1}"#);
//! assert!(header.starts_with("v1,"));
//! assert!(verify(&secret, "msg_1", 1_614_265_330, br#"{"a":1}"#, &header));
//! ```

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Standard base64 that writes padding and accepts a secret with or without it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The prefix of every secret's text form.
pub const SECRET_PREFIX: &str = "whsec_";
/// The fewest key bytes a secret may have (Standard Webhooks: 192 bits).
pub const SECRET_BYTES_MIN: usize = 24;
/// The most key bytes a secret may have (Standard Webhooks: 512 bits).
pub const SECRET_BYTES_MAX: usize = 64;
/// How many key bytes [`Secret::generate`] draws.
pub const SECRET_BYTES_GENERATED: usize = 32;
/// The only signature scheme herald writes and reads.
pub const SIGNATURE_VERSION: &str = "v1";

/// An endpoint's signing key. Its `Debug` form never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

/// Why a text or byte string is not a usable secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretError {
    /// The text does not start with `whsec_`.
    MissingPrefix,
    /// The part after `whsec_` is not standard base64.
    InvalidBase64 { reason: String },
    /// The key has a length outside `[SECRET_BYTES_MIN, SECRET_BYTES_MAX]`.
    InvalidLength { key_bytes: usize },
    /// The operating system's random source failed.
    Random { reason: String },
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::MissingPrefix => write!(f, "a secret must start with \"{SECRET_PREFIX}\""),
            SecretError::InvalidBase64 { reason } => {
                write!(f, "the part of a secret after \"{SECRET_PREFIX}\" must be standard base64: {reason}")
            }
            SecretError::InvalidLength { key_bytes } => write!(
                f,
                "a secret must hold {SECRET_BYTES_MIN} to {SECRET_BYTES_MAX} bytes, this one holds {key_bytes}"
            ),
            SecretError::Random { reason } => write!(f, "could not draw random bytes for a secret: {reason}"),
        }
    }
}

impl std::error::Error for SecretError {}

impl Secret {
    /// Parses the text form `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(encoded).map_err(|e| SecretError::InvalidBase64 { reason: e.to_string() })?;
        Secret::from_bytes(&key)
    }

    /// A secret from raw key bytes, for instance random bytes the caller drew.
    /// The key must hold 24 to 64 bytes.
    pub fn from_bytes(key: &[u8]) -> Result<Secret, SecretError> {
        if !(SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&key.len()) {
            return Err(SecretError::InvalidLength { key_bytes: key.len() });
        }
        Ok(Secret { key: key.to_vec() })
    }

    /// A new secret of [`SECRET_BYTES_GENERATED`] bytes from the operating system's random source.
    pub fn generate() -> Result<Secret, SecretError> {
        let mut key = [0u8; SECRET_BYTES_GENERATED];
        getrandom::fill(&mut key).map_err(|e| SecretError::Random { reason: e.to_string() })?;
        Secret::from_bytes(&key)
    }

    /// The text form `whsec_<base64>`, which [`Secret::parse`] reads back.
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.key))
    }

    /// The raw key bytes.
    pub fn key_bytes(&self) -> &[u8] {
        &self.key
    }

    fn mac(&self, msg_id: &str, timestamp_s: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_s.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({SECRET_PREFIX}<{} bytes redacted>)", self.key.len())
    }
}

/// The `webhook-signature` header value: one `v1,<base64>` entry per secret, space-separated,
/// in the order given (the current secret first). With no secret the value is empty.
pub fn sign(secrets: &[&Secret], msg_id: &str, timestamp_s: i64, body: &[u8]) -> String {
    let mut header = String::new();
    for secret in secrets {
        if !header.is_empty() {
            header.push(' ');
        }
        let tag = secret.mac(msg_id, timestamp_s, body).finalize().into_bytes();
        header.push_str(SIGNATURE_VERSION);
        header.push(',');
        header.push_str(&BASE64.encode(tag));
    }
    header
}

/// Whether any `v1` entry of a `webhook-signature` header is `secret`'s signature of this message.
///
/// The comparison is constant-time. It does not judge the timestamp's age: a receiver should also
/// refuse timestamps too far from its own clock. Entries of other versions are skipped.
pub fn verify(secret: &Secret, msg_id: &str, timestamp_s: i64, body: &[u8], header: &str) -> bool {
    header.split(' ').filter_map(|entry| entry.split_once(',')).any(|(version, encoded)| {
        if version != SIGNATURE_VERSION {
            return false;
        }
        let Ok(tag) = BASE64.decode(encoded) else { return false };
        secret.mac(msg_id, timestamp_s, body).verify_slice(&tag).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example published with the Standard Webhooks reference libraries, recomputed
    /// independently with Python's `hmac` module.
    const KNOWN_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const KNOWN_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const KNOWN_TIMESTAMP_S: i64 = 1_614_265_330;
    const KNOWN_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const KNOWN_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn counting_key() -> Secret {
        Secret::from_bytes(&(0u8..32).collect::<Vec<u8>>()).unwrap()
    }

    #[test]
    fn known_answers() {
        let secret = Secret::parse(KNOWN_SECRET).unwrap();
        assert_eq!(sign(&[&secret], KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY), KNOWN_SIGNATURE);

        // Key bytes 0..32, an empty body: python3 -c 'hmac.new(bytes(range(32)), b"evt_01.1700000000.", sha256)'.
        let counting = counting_key();
        assert_eq!(counting.to_whsec(), "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        assert_eq!(
            sign(&[&counting], "evt_01", 1_700_000_000, b""),
            "v1,CoU3QRvMx1rnZlSLP3cW3e/Ulgu3t1VUWJvM1hsEXDY="
        );
    }

    #[test]
    fn rotation_signs_with_every_secret_in_order() {
        let new = Secret::parse(KNOWN_SECRET).unwrap();
        let old = counting_key();
        let header = sign(&[&new, &old], KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], KNOWN_SIGNATURE);
        assert_eq!(entries[1], sign(&[&old], KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY));
        assert!(verify(&new, KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY, &header));
        assert!(verify(&old, KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY, &header));
        assert_eq!(sign(&[], KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY), "");
    }

    #[test]
    fn verify_rejects_any_change() {
        let secret = Secret::parse(KNOWN_SECRET).unwrap();
        let header = KNOWN_SIGNATURE;
        assert!(verify(&secret, KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY, header));
        assert!(!verify(&secret, "msg_other", KNOWN_TIMESTAMP_S, KNOWN_BODY, header));
        assert!(!verify(&secret, KNOWN_ID, KNOWN_TIMESTAMP_S + 1, KNOWN_BODY, header));
        assert!(!verify(&secret, KNOWN_ID, KNOWN_TIMESTAMP_S, br#"{"test": 2432232315}"#, header));
        assert!(!verify(&counting_key(), KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY, header));
        let other_version = header.replacen("v1,", "v2,", 1);
        assert!(!verify(&secret, KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY, &other_version));
        for garbage in ["", "v1", "v1,", "v1,!!!", "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="] {
            assert!(!verify(&secret, KNOWN_ID, KNOWN_TIMESTAMP_S, KNOWN_BODY, garbage), "{garbage:?}");
        }
    }

    #[test]
    fn parse_names_the_problem() {
        assert_eq!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::MissingPrefix));
        assert_eq!(Secret::parse("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::MissingPrefix));
        assert!(matches!(Secret::parse("whsec_not base64!"), Err(SecretError::InvalidBase64 { .. })));
        assert!(matches!(Secret::parse("whsec_"), Err(SecretError::InvalidLength { key_bytes: 0 })));
        // 16 bytes: too short for Standard Webhooks.
        assert_eq!(
            Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODw=="),
            Err(SecretError::InvalidLength { key_bytes: 16 })
        );
        assert_eq!(Secret::from_bytes(&[7; 65]), Err(SecretError::InvalidLength { key_bytes: 65 }));
        let message = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODw==").unwrap_err().to_string();
        assert!(message.contains("16"), "{message}");
        // Padding is optional on input.
        let unpadded = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").unwrap();
        assert_eq!(unpadded, counting_key());
    }

    #[test]
    fn generated_secrets_round_trip_and_differ() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.key_bytes().len(), SECRET_BYTES_GENERATED);
        assert_eq!(Secret::parse(&a.to_whsec()).unwrap(), a);
        assert!(!format!("{a:?}").contains(&a.to_whsec()[SECRET_PREFIX.len()..]));
    }

    /// herald's headers against the independent `standardwebhooks` crate, both ways.
    mod standardwebhooks_cross_check {
        use super::super::*;
        use reqwest::header::{HeaderMap, HeaderValue};
        use standardwebhooks::Webhook;
        use std::time::{SystemTime, UNIX_EPOCH};

        fn now_s() -> i64 {
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
        }

        fn headers(msg_id: &str, timestamp_s: i64, signature: &str) -> HeaderMap {
            let mut map = HeaderMap::new();
            map.insert("webhook-id", HeaderValue::from_str(msg_id).unwrap());
            map.insert("webhook-timestamp", HeaderValue::from_str(&timestamp_s.to_string()).unwrap());
            map.insert("webhook-signature", HeaderValue::from_str(signature).unwrap());
            map
        }

        #[test]
        fn reference_accepts_herald_headers() {
            let secret = Secret::generate().unwrap();
            let body = br#"{"type":"invoice.paid","data":{"amount":1250}}"#;
            let now = now_s();
            let header = sign(&[&secret], "evt_018f", now, body);
            let reference = Webhook::new(&secret.to_whsec()).unwrap();
            reference.verify(body, &headers("evt_018f", now, &header)).unwrap();
            // A different body is refused by the reference too.
            assert!(reference.verify(b"{}", &headers("evt_018f", now, &header)).is_err());
        }

        #[test]
        fn herald_accepts_reference_signatures() {
            let secret = Secret::generate().unwrap();
            let body = br#"{"hello":"world"}"#;
            let now = now_s();
            let reference = Webhook::new(&secret.to_whsec()).unwrap();
            let header = reference.sign("evt_1", now, body).unwrap();
            assert!(verify(&secret, "evt_1", now, body, &header));
            assert_eq!(header, sign(&[&secret], "evt_1", now, body));
        }

        #[test]
        fn rotated_pair_verifies_with_either_secret() {
            let new = Secret::generate().unwrap();
            let old = Secret::generate().unwrap();
            let stranger = Secret::generate().unwrap();
            let body = br#"{"rotated":true}"#;
            let now = now_s();
            let header = sign(&[&new, &old], "evt_2", now, body);
            assert_eq!(header.split(' ').count(), 2);
            for secret in [&new, &old] {
                let reference = Webhook::new(&secret.to_whsec()).unwrap();
                reference.verify(body, &headers("evt_2", now, &header)).unwrap();
                assert!(verify(secret, "evt_2", now, body, &header));
            }
            let reference = Webhook::new(&stranger.to_whsec()).unwrap();
            assert!(reference.verify(body, &headers("evt_2", now, &header)).is_err());
            assert!(!verify(&stranger, "evt_2", now, body, &header));
        }
    }
}
