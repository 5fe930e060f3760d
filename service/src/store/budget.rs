//! OEM rate budgets kept in the database, so that every replica spends
//! from the same buckets: the bucket of an account and the last write to a
//! device are read, decided on and written back in one write transaction
//! (the rows locked on PostgreSQL).

use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::{Expr, OnConflict},
};

use super::{
    Store, db_err,
    entity::{device_write, rate_bucket},
    rows,
};
use crate::domain::{Error, Ts};

/// A token bucket as stored: tokens left, counted at `at`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    /// Tokens left.
    pub tokens: f64,
    /// When they were counted.
    pub at: Ts,
}

/// What a budget decision makes of the stored state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spend {
    /// Go ahead, or not before this instant.
    pub verdict: Result<(), Ts>,
    /// The account's bucket to store, if it changed.
    pub bucket: Option<Bucket>,
    /// The device's last write to store, if one is made now.
    pub wrote: Option<Ts>,
}

impl Store {
    /// Runs `decide` on the account's bucket (`None`: never used) and the
    /// device's last write (`None`: never, or no device given), in one
    /// write transaction, and stores what it returns.
    pub async fn spend_budget(
        &self,
        account: &str,
        device_key: Option<&str>,
        decide: impl Fn(Option<Bucket>, Option<Ts>) -> Spend,
    ) -> Result<Result<(), Ts>, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let bucket = rows::first(
                &tx,
                rate_bucket::Entity::find()
                    .filter(rate_bucket::Column::Account.eq(account))
                    .lock_exclusive(),
            )
            .await?;
            let last = match device_key {
                Some(k) => {
                    rows::first(
                        &tx,
                        device_write::Entity::find()
                            .filter(device_write::Column::DeviceKey.eq(k))
                            .lock_exclusive(),
                    )
                    .await?
                }
                None => None,
            };
            let spend = decide(
                bucket.as_ref().map(|b| Bucket {
                    tokens: b.tokens,
                    at: Ts(b.at_ns),
                }),
                last.as_ref().map(|l| Ts(l.last_ns)),
            );
            if let Some(b) = spend.bucket {
                if bucket.is_some() {
                    rate_bucket::Entity::update_many()
                        .col_expr(rate_bucket::Column::Tokens, Expr::value(b.tokens))
                        .col_expr(rate_bucket::Column::AtNs, Expr::value(b.at.0))
                        .filter(rate_bucket::Column::Account.eq(account))
                        .exec(&tx)
                        .await
                        .map_err(db_err)?;
                } else {
                    let row = rate_bucket::ActiveModel {
                        account: Set(account.to_owned()),
                        tokens: Set(b.tokens),
                        at_ns: Set(b.at.0),
                    };
                    first_insert(
                        &tx,
                        rate_bucket::Entity::insert(row).on_conflict(
                            OnConflict::column(rate_bucket::Column::Account)
                                .do_nothing()
                                .to_owned(),
                        ),
                    )
                    .await?;
                }
            }
            if let (Some(at), Some(k)) = (spend.wrote, device_key) {
                if last.is_some() {
                    device_write::Entity::update_many()
                        .col_expr(device_write::Column::LastNs, Expr::value(at.0))
                        .filter(device_write::Column::DeviceKey.eq(k))
                        .exec(&tx)
                        .await
                        .map_err(db_err)?;
                } else {
                    let row = device_write::ActiveModel {
                        device_key: Set(k.to_owned()),
                        last_ns: Set(at.0),
                    };
                    first_insert(
                        &tx,
                        device_write::Entity::insert(row).on_conflict(
                            OnConflict::column(device_write::Column::DeviceKey)
                                .do_nothing()
                                .to_owned(),
                        ),
                    )
                    .await?;
                }
            }
            tx.commit().await.map_err(db_err)?;
            Ok(spend.verdict)
        })
        .await
    }
}

/// Inserts a row that was not there when read: if another replica
/// inserted it meanwhile (PostgreSQL locks no row that does not exist
/// yet), nothing is written and the whole decision is run again on the
/// row as it now is.
async fn first_insert<A, C>(conn: &C, insert: sea_orm::Insert<A>) -> Result<(), Error>
where
    A: sea_orm::ActiveModelTrait,
    C: ConnectionTrait,
{
    let n = insert.exec_without_returning(conn).await.map_err(db_err)?;
    if n == 0 {
        return Err(Error::StorageContention(
            "a budget row was created by another replica meanwhile".into(),
        ));
    }
    Ok(())
}
