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

/// KeyRing holds the signing keys assetflow uses, loaded once at start-up.
pub struct KeyRing {
    pub provider: PKey<Private>,
    issuers: HashMap<String, PKey<Private>>,
    /// Public halves of provider keys rotated out: what they signed still verifies.
    retired: Vec<PKey<Public>>,
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
                    issuers.insert(id, load_private_key(&path)?);
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
                    retired
                        .push(PKey::public_key_from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
                }
            }
        }
        Ok(KeyRing { provider, issuers, retired })
    }

    /// KeyRing::verify_provider checks a document signed by the service provider, with the
    /// current key or any retired one.
    pub fn verify_provider(&self, document: &serde_json::Value) -> Result<(), super::CryptoError> {
        let current = super::verify_document(&self.provider, document);
        if current.is_ok() {
            return current;
        }
        for key in &self.retired {
            if super::verify_document(key, document).is_ok() {
                return Ok(());
            }
        }
        current
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
    pub fn issuer(&self, issuer_id: &str) -> Option<&PKeyRef<Private>> {
        self.issuers.get(issuer_id).map(|k| k.as_ref())
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
        KeyRing {
            provider: generate_key_pair().expect("key generation"),
            issuers: issuers.iter().map(|id| (id.to_string(), generate_key_pair().expect("key generation"))).collect(),
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
        let mut old = json!({"certificate_id": "c-1"});
        crate::crypto::sign_document(&before.provider, &mut old).unwrap();

        KeyRing::rotate_provider(&dir).unwrap();
        let after = KeyRing::load(&dir).unwrap();
        let mut new = json!({"certificate_id": "c-2"});
        crate::crypto::sign_document(&after.provider, &mut new).unwrap();

        after.verify_provider(&old).expect("signed by the retired key");
        after.verify_provider(&new).expect("signed by the current key");
        assert!(crate::crypto::verify_document(&after.provider, &old).is_err(), "the key did change");
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
