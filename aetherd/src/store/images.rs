//! Images and the reservations that hold an image id while it is imported or deleted.

use rusqlite::{named_params, params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::{corrupt, now, Owner, Store};
use crate::error::{Error, Result};
use crate::images::{BootMode, Image, ImageId, ImageName};

/// Images with the number of workspaces using each; `:viewer` is the caller's uid (only
/// their workspaces are counted) or NULL for an admin (all are).
const IMAGE_QUERY: &str = "SELECT i.name, i.owner_uid, i.boot_mode, i.cmdline, i.virtual_size, \
     i.disk_size, i.created_at, (SELECT COUNT(*) FROM workspaces w WHERE w.image = i.id \
     AND (:viewer IS NULL OR w.owner_uid = :viewer)) FROM images i";

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    let name = ImageName::parse(&r.get::<_, String>(0)?).map_err(|e| corrupt("image name", e))?;
    Ok(Image {
        id: ImageId::new(name, r.get(1)?),
        boot_mode: BootMode::parse(&r.get::<_, String>(2)?).map_err(|e| corrupt("boot mode", e))?,
        cmdline: r.get(3)?,
        virtual_size: r.get::<_, i64>(4)? as u64,
        disk_size: r.get::<_, i64>(5)? as u64,
        created_at: r.get(6)?,
        in_use: r.get(7)?,
    })
}

/// Only one daemon uses a state database, and it opens the store before serving: every
/// image reservation found then was left by a daemon that died during an import or delete.
/// (Their staging files go with them, see `Layout::create`.)
pub(super) fn drop_stale_image_reservations(conn: &Connection) -> Result<()> {
    let n = conn.execute("DELETE FROM image_reservations", [])?;
    if n > 0 {
        tracing::info!(
            reservations = n,
            "dropped image imports and deletes interrupted by a restart"
        );
    }
    Ok(())
}

/// What an image reservation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageReservation {
    Importing,
    Deleting,
}

impl ImageReservation {
    fn as_str(self) -> &'static str {
        match self {
            ImageReservation::Importing => "importing",
            ImageReservation::Deleting => "deleting",
        }
    }
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Refuses `name` if an import or delete holds it; `Ok` when it is free.
fn check_unreserved(tx: &Connection, name: &ImageId) -> Result<()> {
    let held: Option<String> = tx
        .query_row(
            "SELECT state FROM image_reservations WHERE id = ?1",
            [name.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    match held.as_deref() {
        None => Ok(()),
        Some("deleting") => Err(Error::AlreadyExists(format!(
            "image {} is being deleted",
            name.name()
        ))),
        Some(_) => Err(Error::AlreadyExists(format!(
            "image {} is being imported",
            name.name()
        ))),
    }
}

impl Store {
    /// Reserves image `id` for an import before any of its files is written: refused at once
    /// (`AlreadyExists`) while the image exists or another import or delete holds it.
    /// Returns the reservation's token, which [`Store::finish_image_import`] and
    /// [`Store::release_image`] need.
    pub fn reserve_image_import(&self, id: &ImageId) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM images WHERE id = ?1)",
            [id.to_string()],
            |r| r.get(0),
        )?;
        if exists {
            return Err(Error::AlreadyExists(format!(
                "image {} already exists",
                id.name()
            )));
        }
        check_unreserved(&tx, id)?;
        let token = random_token();
        tx.execute(
            "INSERT INTO image_reservations (id, state, token, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                id.to_string(),
                ImageReservation::Importing.as_str(),
                token,
                now()
            ],
        )?;
        tx.commit()?;
        Ok(token)
    }

    /// Ends the import holding `token`: its reservation becomes the image row, in one
    /// transaction.
    pub fn finish_image_import(&self, image: &Image, token: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = image.id.to_string();
        let held = tx.execute(
            "DELETE FROM image_reservations WHERE id = ?1 AND token = ?2 AND state = 'importing'",
            params![id, token],
        )?;
        if held != 1 {
            return Err(Error::Internal(format!(
                "the import of image {id} lost its reservation"
            )));
        }
        let res = tx.execute(
            "INSERT INTO images (id, owner_uid, name, boot_mode, cmdline, virtual_size, disk_size,
                                 created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                image.id.owner_uid(),
                image.id.name().as_str(),
                image.boot_mode.as_str(),
                image.cmdline,
                image.virtual_size as i64,
                image.disk_size as i64,
                image.created_at
            ],
        );
        match res {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(Error::AlreadyExists(format!(
                    "image {} already exists",
                    image.id.name()
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit()?;
        Ok(())
    }

    /// Gives up the reservation of `id` held by `token` (nothing if it is not held by it).
    pub fn release_image(&self, id: &ImageId, token: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM image_reservations WHERE id = ?1 AND token = ?2",
            params![id.to_string(), token],
        )?;
        Ok(())
    }

    /// The image with id `id`, whoever owns it (for the daemon's own use, e.g. a workspace's
    /// recorded image); its `in_use` counts every workspace.
    pub fn get_image(&self, id: &ImageId) -> Result<Image> {
        self.conn()
            .query_row(
                &format!("{IMAGE_QUERY} WHERE i.id = :id"),
                named_params! { ":viewer": None::<u32>, ":id": id.to_string() },
                image_from_row,
            )
            .optional()?
            .ok_or_else(|| Error::not_found("image", id.to_string()))
    }

    /// The image `reference` means to a caller (`viewer`: `None` for an admin): `NAME@UID`
    /// is that image, found only by its owner or an admin; a plain name is the caller's own
    /// image of that name, else the shared one (root's). Anything else is not found, so no
    /// one learns another user's image names.
    pub fn resolve_image(&self, reference: &str, viewer: Owner) -> Result<Image> {
        let id = ImageId::parse(reference)?;
        let not_found = || Error::not_found("image", reference);
        let conn = self.conn();
        let found = if reference.contains('@') {
            if viewer.is_some_and(|uid| uid != id.owner_uid()) {
                return Err(not_found());
            }
            conn.query_row(
                &format!("{IMAGE_QUERY} WHERE i.id = :id"),
                named_params! { ":viewer": viewer, ":id": id.to_string() },
                image_from_row,
            )
        } else {
            conn.query_row(
                &format!(
                    "{IMAGE_QUERY} WHERE i.name = :name AND i.owner_uid IN (0, :viewer) \
                     ORDER BY i.owner_uid = 0 LIMIT 1"
                ),
                named_params! { ":viewer": viewer, ":name": reference },
                image_from_row,
            )
        };
        found.optional()?.ok_or_else(not_found)
    }

    /// The images a caller sees (`viewer`: `None` for an admin, who sees all): their own
    /// and the shared ones.
    pub fn list_images(&self, viewer: Owner) -> Result<Vec<Image>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{IMAGE_QUERY} WHERE :viewer IS NULL OR i.owner_uid IN (0, :viewer) \
             ORDER BY i.name, i.owner_uid"
        ))?;
        let rows = stmt.query_map(named_params! { ":viewer": viewer }, image_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes an image row, refused while a workspace uses it, and reserves the id until
    /// the caller has removed the files and calls [`Store::release_image`] with the token
    /// returned (so an import of the same image cannot write them meanwhile).
    pub fn delete_image(&self, id: &ImageId) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        check_unreserved(&tx, id)?;
        let key = id.to_string();
        let users: Vec<String> = {
            let mut stmt = tx.prepare("SELECT id FROM workspaces WHERE image = ?1 ORDER BY id")?;
            let rows = stmt.query_map([&key], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if !users.is_empty() {
            return Err(Error::precondition(format!(
                "image {} is used by {}; delete those workspaces first",
                id.name(),
                users.join(", ")
            )));
        }
        if tx.execute("DELETE FROM images WHERE id = ?1", [&key])? == 0 {
            return Err(Error::not_found("image", &key));
        }
        let token = random_token();
        tx.execute(
            "INSERT INTO image_reservations (id, state, token, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![key, ImageReservation::Deleting.as_str(), token, now()],
        )?;
        tx.commit()?;
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Error;
    use crate::images::{BootMode, Image, ImageId};
    use crate::store::test_util::*;
    use crate::store::Store;

    #[test]
    fn image_names_are_reserved_while_imported_or_deleted_and_freed_by_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = Store::open(&path).unwrap();
        let name = ImageId::parse("img").unwrap();
        let image = Image {
            id: name.clone(),
            boot_mode: BootMode::Bios,
            cmdline: String::new(),
            virtual_size: 1 << 30,
            disk_size: 1 << 20,
            created_at: 1,
            in_use: 0,
        };
        let token = s.reserve_image_import(&name).unwrap();
        let e = s.reserve_image_import(&name).unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        assert_eq!(e.to_string(), "image img is being imported");
        // A reservation is not an image.
        assert!(s.list_images(None).unwrap().is_empty());
        assert!(s.get_image(&name).is_err());
        // Only its holder finishes or releases it.
        assert!(s.finish_image_import(&image, "not-the-token").is_err());
        s.release_image(&name, "not-the-token").unwrap();
        assert!(s.reserve_image_import(&name).is_err());
        s.finish_image_import(&image, &token).unwrap();
        assert_eq!(s.list_images(None).unwrap(), vec![image.clone()]);
        assert_eq!(
            s.reserve_image_import(&name).unwrap_err().to_string(),
            "image img already exists"
        );
        s.release_image(&name, &token).unwrap();
        assert_eq!(
            s.list_images(None).unwrap().len(),
            1,
            "a finished import stays"
        );

        // A delete holds the name until its files are gone.
        let deleting = s.delete_image(&name).unwrap();
        assert!(s.list_images(None).unwrap().is_empty());
        assert_eq!(
            s.reserve_image_import(&name).unwrap_err().to_string(),
            "image img is being deleted"
        );
        s.release_image(&name, &deleting).unwrap();
        let token = s.reserve_image_import(&name).unwrap();
        s.release_image(&name, &token).unwrap();

        // A daemon that dies during an import leaves its reservation; the next open drops it.
        s.reserve_image_import(&name).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        s.reserve_image_import(&name).unwrap();
    }

    #[test]
    fn images_belong_to_their_owner_and_roots_are_shared() {
        let (_dir, s) = store();
        let add = |reference: &str| {
            let id = ImageId::parse(reference).unwrap();
            let token = s.reserve_image_import(&id).unwrap();
            let image = Image {
                id,
                boot_mode: BootMode::Bios,
                cmdline: String::new(),
                virtual_size: 1 << 30,
                disk_size: 1 << 20,
                created_at: 1,
                in_use: 0,
            };
            s.finish_image_import(&image, &token).unwrap();
        };
        add("shared");
        add("dev");
        add("dev@1000");
        add("mine@1000");
        add("mine@1001");
        let ids = |viewer| -> Vec<String> {
            let list = s.list_images(viewer).unwrap();
            list.iter().map(|i| i.id.to_string()).collect()
        };
        assert_eq!(
            ids(None),
            ["dev", "dev@1000", "mine@1000", "mine@1001", "shared"]
        );
        assert_eq!(ids(Some(1000)), ["dev", "dev@1000", "mine@1000", "shared"]);
        assert_eq!(ids(Some(1001)), ["dev", "mine@1001", "shared"]);
        let resolve = |r: &str, viewer| s.resolve_image(r, viewer).map(|i| i.id.to_string());
        // A plain name: one's own first, then root's.
        assert_eq!(resolve("dev", Some(1000)).unwrap(), "dev@1000");
        assert_eq!(resolve("dev", Some(1001)).unwrap(), "dev");
        assert_eq!(resolve("dev", None).unwrap(), "dev");
        assert_eq!(resolve("mine", Some(1001)).unwrap(), "mine@1001");
        assert_eq!(resolve("shared", Some(1001)).unwrap(), "shared");
        // Another user's image is not found, by name or by id.
        for (r, viewer) in [
            ("mine@1000", Some(1001)),
            ("dev@1000", Some(1001)),
            ("x", Some(1000)),
        ] {
            let e = resolve(r, viewer).unwrap_err();
            assert!(matches!(e, Error::NotFound { .. }), "{r}: {e:?}");
        }
        assert_eq!(resolve("mine@1000", Some(1000)).unwrap(), "mine@1000");
        assert_eq!(resolve("mine@1000", None).unwrap(), "mine@1000");
        assert!(matches!(
            resolve("a@b", Some(1000)),
            Err(Error::InvalidArgument(_))
        ));
    }
}
