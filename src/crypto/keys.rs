//! The key ring: the service provider's key and one key per issuer, as PEM files in `keys.dir`.
//!
//! Layout: `provider.pem` (service provider, signs assets and certificates) and
//! `issuers/<issuer_id>.pem` (signs the asset information of that issuer's products). Rotating the
//! provider key (`assetflow keys rotate`) keeps the old public key in `retired/`, so that the
//! certificates it signed can still be exchanged.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, PKeyRef, Private, Public};

/// generate_key_pair makes a new ECDSA P-256 key.
pub fn generate_key_pair() -> Result<PKey<Private>, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

/// public_key_pem is the PEM (SubjectPublicKeyInfo) of a key's public half.
pub fn public_key_pem(key: &PKeyRef<Private>) -> Result<String, openssl::error::ErrorStack> {
    Ok(String::from_utf8(key.public_key_to_pem()?).expect("PEM is ASCII"))
}

/// load_private_key reads a PKCS#8 or traditional PEM private key.
pub fn load_private_key(path: &Path) -> anyhow::Result<PKey<Private>> {
    let pem = fs::read(path).map_err(|e| anyhow::anyhow!("cannot read key {}: {e}", path.display()))?;
    PKey::private_key_from_pem(&pem).map_err(|e| anyhow::anyhow!("{} is not a PEM private key: {e}", path.display()))
}

/// KeyRing holds the signing keys assetflow uses, loaded once at start-up by the processes that
/// sign (the issuance pool), and by nobody else ([`KeyRing::none`]). Each key comes with its key
/// id ([`super::key_id`]), which the documents it signs carry.
pub struct KeyRing {
    provider: Option<Signing>,
    issuers: HashMap<String, Signing>,
    /// Public halves of provider keys rotated out, with their key ids: what they signed still
    /// verifies.
    retired: Vec<(PKey<Public>, String)>,
}

/// Signing is a private key, its public half and its key id.
pub struct Signing {
    pub key: PKey<Private>,
    pub public: PKey<Public>,
    pub key_id: String,
}

impl Signing {
    fn new(key: PKey<Private>) -> anyhow::Result<Signing> {
        let key_id = super::key_id(&key)?;
        let public = PKey::public_key_from_pem(&key.public_key_to_pem()?)?;
        Ok(Signing { key, public, key_id })
    }
}

/// Published is a public key as `assetflow keys publish` lists it.
pub struct Published {
    pub key: PKey<Public>,
    pub key_id: String,
    /// "provider" or "issuer".
    pub role: &'static str,
    pub issuer_id: Option<String>,
    /// "current" (it signs now) or "retired" (what it signed still verifies).
    pub status: &'static str,
}

impl KeyRing {
    /// KeyRing::load reads `provider.pem` and every `issuers/*.pem` under `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<KeyRing> {
        let provider = load_private_key(&dir.join("provider.pem"))
            .map_err(|e| anyhow::anyhow!("{e}\nhint: run `assetflow keys generate` to create development keys"))?;
        let mut issuers = HashMap::new();
        let issuer_dir = dir.join("issuers");
        if issuer_dir.is_dir() {
            for entry in fs::read_dir(&issuer_dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "pem") {
                    let id = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                    issuers.insert(id, Signing::new(load_private_key(&path)?)?);
                }
            }
        }
        let mut retired = Vec::new();
        let retired_dir = dir.join("retired");
        if retired_dir.is_dir() {
            for entry in fs::read_dir(&retired_dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "pem") {
                    let pem = fs::read(&path)?;
                    let key =
                        PKey::public_key_from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let key_id = super::key_id(&key)?;
                    retired.push((key, key_id));
                }
            }
        }
        Ok(KeyRing { provider: Some(Signing::new(provider)?), issuers, retired })
    }

    /// KeyRing::none is the ring of a process that signs nothing: it holds no key at all.
    pub fn none() -> KeyRing {
        KeyRing { provider: None, issuers: HashMap::new(), retired: Vec::new() }
    }

    /// KeyRing::provider is the service provider's signing key, if this process holds it.
    pub fn provider(&self) -> Option<&Signing> {
        self.provider.as_ref()
    }

    /// KeyRing::verify_provider checks a document signed by the service provider: with the key its
    /// `key_id` names, current or retired, or, for a document that names none, with any of them.
    pub fn verify_provider(&self, document: &serde_json::Value) -> Result<(), super::CryptoError> {
        let current = self.provider.iter().map(|s| (&s.public, s.key_id.as_str()));
        let keys: Vec<(&PKey<Public>, &str)> =
            current.chain(self.retired.iter().map(|(key, id)| (key, id.as_str()))).collect();
        let named = document.get("key_id").and_then(serde_json::Value::as_str);
        let mut verdict = Err(super::CryptoError::BadSignature);
        for (key, _) in keys.iter().filter(|(_, id)| named.is_none_or(|n| n == *id)) {
            verdict = super::verify_document(key, document);
            if verdict.is_ok() {
                return verdict;
            }
        }
        verdict
    }

    /// KeyRing::published is every public key a terminal may need to verify what assetflow signed:
    /// the provider's, current and retired, and each issuer's.
    pub fn published(&self) -> anyhow::Result<Vec<Published>> {
        let mut keys = Vec::new();
        if let Some(provider) = &self.provider {
            keys.push(Published {
                key: provider.public.clone(),
                key_id: provider.key_id.clone(),
                role: "provider",
                issuer_id: None,
                status: "current",
            });
        }
        for (key, key_id) in &self.retired {
            let (key, key_id) = (key.clone(), key_id.clone());
            keys.push(Published { key, key_id, role: "provider", issuer_id: None, status: "retired" });
        }
        let mut issuers: Vec<(&String, &Signing)> = self.issuers.iter().collect();
        issuers.sort_by_key(|(id, _)| *id);
        for (id, signing) in issuers {
            keys.push(Published {
                key: signing.public.clone(),
                key_id: signing.key_id.clone(),
                role: "issuer",
                issuer_id: Some(id.clone()),
                status: "current",
            });
        }
        Ok(keys)
    }

    /// KeyRing::rotate_provider retires the provider key (its public half moves to `retired/`)
    /// and writes a new one. It returns the retired key's file.
    pub fn rotate_provider(dir: &Path) -> anyhow::Result<PathBuf> {
        let current = load_private_key(&dir.join("provider.pem"))?;
        private_dir(&dir.join("retired"))?;
        let retired = dir.join("retired").join(format!(
            "provider-{}-{}.pem",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        fs::write(&retired, current.public_key_to_pem()?)?;
        write_private_key(&dir.join("provider.pem"), &generate_key_pair()?.private_key_to_pem_pkcs8()?)?;
        Ok(retired)
    }

    /// KeyRing::issuer is the signing key of an issuer, if assetflow holds it.
    pub fn issuer(&self, issuer_id: &str) -> Option<&Signing> {
        self.issuers.get(issuer_id)
    }

    /// KeyRing::generate writes development keys: the provider key and one key per named issuer.
    /// Existing files are kept unless `overwrite` is set. It returns the files it wrote.
    pub fn generate(dir: &Path, issuers: &[String], overwrite: bool) -> anyhow::Result<Vec<PathBuf>> {
        private_dir(&dir.join("issuers"))?;
        let mut targets = vec![dir.join("provider.pem")];
        targets.extend(issuers.iter().map(|id| dir.join("issuers").join(format!("{id}.pem"))));
        let mut written = Vec::new();
        for path in targets {
            if path.exists() && !overwrite {
                continue;
            }
            // Replacing the provider key retires the old one: the certificates it signed stay valid.
            if path.exists() && path == dir.join("provider.pem") {
                written.push(Self::rotate_provider(dir)?);
                written.push(path);
                continue;
            }
            let pem = generate_key_pair()?.private_key_to_pem_pkcs8()?;
            write_private_key(&path, &pem)?;
            written.push(path);
        }
        Ok(written)
    }

    /// KeyRing::ephemeral is a ring of fresh keys that never touches the disk.
    pub fn ephemeral(issuers: &[&str]) -> KeyRing {
        let fresh = || Signing::new(generate_key_pair().expect("key generation")).expect("a P-256 key");
        KeyRing {
            provider: Some(fresh()),
            issuers: issuers.iter().map(|id| (id.to_string(), fresh())).collect(),
            retired: Vec::new(),
        }
    }
}

/// private_dir creates a directory of the key ring, and any missing parent, readable by their
/// owner only (0700): the directory listing names the issuers, and nobody else needs to open it.
/// An existing directory keeps its mode (a deployment may share it with a group on purpose).
fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// write_private_key writes a PEM private key readable by its owner only.
pub fn write_private_key(path: &Path, pem: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Private keys are readable by their owner only.
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // `mode` applies to a new file only: an existing one is made private too.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(pem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_signed_before_a_rotation_still_verify() {
        let dir = std::env::temp_dir().join(format!("assetflow-keys-{}", uuid::Uuid::new_v4().simple()));
        KeyRing::generate(&dir, &["issuer".into()], false).unwrap();
        let before = KeyRing::load(&dir).unwrap();
        let mut old = json!({"certificate_id": "c-1", "key_id": before.provider().unwrap().key_id});
        crate::crypto::sign_document(&before.provider().unwrap().key, &mut old).unwrap();

        KeyRing::rotate_provider(&dir).unwrap();
        let after = KeyRing::load(&dir).unwrap();
        let mut new = json!({"certificate_id": "c-2"});
        crate::crypto::sign_document(&after.provider().unwrap().key, &mut new).unwrap();

        after.verify_provider(&old).expect("signed by the retired key, which its key id names");
        after.verify_provider(&new).expect("signed by the current key, named by no key id");
        assert!(crate::crypto::verify_document(&after.provider().unwrap().key, &old).is_err(), "the key did change");
        let mut misnamed = old.clone();
        misnamed["key_id"] = json!(after.provider().unwrap().key_id);
        crate::crypto::sign_document(&before.provider().unwrap().key, &mut misnamed).unwrap();
        assert!(after.verify_provider(&misnamed).is_err(), "only the key its id names is tried");
        let published = after.published().unwrap();
        let roles: Vec<(&str, &str)> = published.iter().map(|p| (p.role, p.status)).collect();
        assert_eq!(roles, [("provider", "current"), ("provider", "retired"), ("issuer", "current")]);
        assert_eq!(published[1].key_id, before.provider().unwrap().key_id);
        let mut forged = old.clone();
        forged["certificate_id"] = json!("c-3");
        assert!(after.verify_provider(&forged).is_err());
        let mode = std::fs::metadata(dir.join("provider.pem")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0, "private keys are private");
        for created in [dir.clone(), dir.join("retired")] {
            let mode = std::fs::metadata(&created).unwrap().permissions();
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o700, "{created:?} is the owner's");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
