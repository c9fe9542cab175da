//! The order service's gRPC API: place, read, list, cancel and watch orders.
use std::pin::Pin;
use std::time::Duration;

use choreo::Outbox;
use choreo::grpc::ApiError;
use contracts::SagaEvent;
use contracts::events::v1 as ev;
use contracts::order::v1::{self as api, order_service_server::OrderService};
use sqlx::PgPool;
use tokio_stream::Stream;
use tonic::{Request, Response, Status as GrpcStatus};
use uuid::Uuid;

use crate::domain::{NewOrder, Status};
use crate::{handler, store};

pub struct OrderApi {
    pub pool: PgPool,
    pub outbox: Outbox,
    pub deadline: Duration,
    pub placer: crate::placer::Placer,
    pub watches: crate::watch::Watches,
}

const MAX_PAGE: u32 = 500;

fn order_id(text: &str) -> Result<Uuid, ApiError> {
    contracts::parse_order_id(text).map_err(ApiError::InvalidArgument)
}

/// The API's work, in domain terms; the trait impl below only unwraps
/// requests and turns [`ApiError`] into a status.
impl OrderApi {
    async fn load(&self, id: Uuid) -> Result<api::Order, ApiError> {
        store::load(&self.pool, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no order {id}")))
    }

    async fn place(
        &self,
        request: api::PlaceOrderRequest,
    ) -> Result<api::PlaceOrderResponse, ApiError> {
        let order = NewOrder::validate(request).map_err(ApiError::InvalidArgument)?;
        let id = Uuid::now_v7();
        let payload = ev::OrderCreated {
            customer: order.customer.clone(),
            destination: order.destination.clone(),
            contact: order.contact.clone(),
            lines: order
                .lines
                .iter()
                .map(|(sku, quantity)| ev::OrderLine {
                    sku: sku.clone(),
                    quantity: *quantity,
                })
                .collect(),
        };
        let created = self.outbox.envelope(&id.to_string(), None, &payload);
        let detail = handler::detail(&SagaEvent::OrderCreated(payload));
        let (key, fingerprint) = (order.idempotency_key.clone(), order.fingerprint());
        // The answer is the order as its transaction wrote it: no read back.
        if let Some(placed) = self.placer.place(id, order, created, detail).await? {
            tracing::Span::current().record("order_id", tracing::field::display(id));
            tracing::info!("order placed");
            return Ok(api::PlaceOrderResponse {
                order: Some(placed),
                created: true,
            });
        }
        // The key was used before (or by a concurrent request that won): same order, nothing new.
        let (id, used_for) = store::find_by_key(&mut *self.pool.acquire().await?, &key)
            .await?
            .ok_or_else(|| ApiError::Internal("idempotency key vanished".into()))?;
        if used_for != fingerprint {
            return Err(ApiError::AlreadyExists(format!(
                "idempotency_key {key:?} was already used for order {id} with different contents; use a new key for a new order"
            )));
        }
        tracing::Span::current().record("order_id", tracing::field::display(id));
        Ok(api::PlaceOrderResponse {
            order: Some(self.load(id).await?),
            created: false,
        })
    }

    async fn list(
        &self,
        request: api::ListOrdersRequest,
    ) -> Result<api::ListOrdersResponse, ApiError> {
        let status = match api::OrderStatus::try_from(request.status) {
            Ok(s) => Status::from_proto(s),
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "status {} is not an OrderStatus",
                    request.status
                )));
            }
        };
        let page_size = match request.page_size {
            0 => 50,
            n if n > MAX_PAGE => {
                return Err(ApiError::InvalidArgument(format!(
                    "page_size {n} is too large: ask for at most {MAX_PAGE}"
                )));
            }
            n => n,
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(Uuid::parse_str(&request.page_token).map_err(|_| {
                ApiError::InvalidArgument(
                    "page_token is not one this server gave out; start again with an empty token"
                        .into(),
                )
            })?)
        };
        let customer = request.customer.trim();
        contracts::check_text("customer", customer).map_err(ApiError::InvalidArgument)?;
        if customer.len() > crate::domain::MAX_TEXT {
            return Err(ApiError::InvalidArgument(format!(
                "customer is longer than {} characters: no order has such a customer",
                crate::domain::MAX_TEXT
            )));
        }
        let filter = store::Filter {
            status,
            stuck_only: request.stuck_only,
            customer: (!customer.is_empty()).then(|| customer.to_owned()),
        };
        let mut orders = store::list(&self.pool, &filter, after, page_size as i64 + 1).await?;
        let next_page_token = if orders.len() > page_size as usize {
            orders.truncate(page_size as usize);
            orders
                .last()
                .map(|o| o.order_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(api::ListOrdersResponse {
            orders,
            next_page_token,
        })
    }

    async fn count(&self) -> Result<api::CountOrdersResponse, ApiError> {
        let (counts, stuck) = store::count(&self.pool).await?;
        Ok(api::CountOrdersResponse {
            counts: counts
                .into_iter()
                .map(|(status, n)| api::StatusCount {
                    status: status.to_proto() as i32,
                    count: n as u64,
                })
                .collect(),
            stuck: stuck as u64,
        })
    }

    async fn cancel(&self, request: api::CancelOrderRequest) -> Result<api::Order, ApiError> {
        let id = order_id(&request.order_id)?;
        contracts::check_text("reason", &request.reason).map_err(ApiError::InvalidArgument)?;
        if request.reason.len() > 500 {
            return Err(ApiError::InvalidArgument(
                "reason is longer than 500 characters".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let status = store::lock(&mut tx, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no order {id}")))?;
        if status == Status::Completed {
            return Err(ApiError::FailedPrecondition(format!(
                "order {id} is already COMPLETED; a completed order cannot be cancelled"
            )));
        }
        if status.is_open() {
            let why = request.reason.trim();
            let reason = if why.is_empty() {
                "customer: cancelled by the customer".to_owned()
            } else {
                format!("customer: {why}")
            };
            handler::start_cancel(&mut tx, &self.outbox, id, &reason, self.deadline).await?;
            tracing::info!(%reason, "customer cancelled the order");
        }
        let order = store::load_in(&mut tx, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no order {id}")))?;
        tx.commit().await?;
        Ok(order)
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[tracing::instrument(skip_all, fields(order_id))]
    async fn place_order(
        &self,
        request: Request<api::PlaceOrderRequest>,
    ) -> Result<Response<api::PlaceOrderResponse>, GrpcStatus> {
        Ok(Response::new(self.place(request.into_inner()).await?))
    }

    async fn get_order(
        &self,
        request: Request<api::GetOrderRequest>,
    ) -> Result<Response<api::Order>, GrpcStatus> {
        let id = order_id(&request.get_ref().order_id)?;
        Ok(Response::new(self.load(id).await?))
    }

    async fn list_orders(
        &self,
        request: Request<api::ListOrdersRequest>,
    ) -> Result<Response<api::ListOrdersResponse>, GrpcStatus> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(order_id = %request.get_ref().order_id))]
    async fn cancel_order(
        &self,
        request: Request<api::CancelOrderRequest>,
    ) -> Result<Response<api::Order>, GrpcStatus> {
        let cancelled = choreo::outbox::publish_after_commit(self.cancel(request.into_inner()));
        Ok(Response::new(cancelled.await?))
    }

    async fn count_orders(
        &self,
        _request: Request<api::CountOrdersRequest>,
    ) -> Result<Response<api::CountOrdersResponse>, GrpcStatus> {
        Ok(Response::new(self.count().await?))
    }

    type WatchOrderStream =
        Pin<Box<dyn Stream<Item = Result<api::StatusChange, GrpcStatus>> + Send>>;

    async fn watch_order(
        &self,
        request: Request<api::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, GrpcStatus> {
        let id = order_id(&request.get_ref().order_id)?;
        let permit = self.watches.admit().ok_or_else(|| {
            GrpcStatus::resource_exhausted(format!(
                "{} order watches are open, the most this server keeps; try again later",
                self.watches.limit()
            ))
        })?;
        // Subscribed and counted as a watcher (so status changes notify)
        // before the first read, so no change falls in between.
        let mut changed = self.watches.subscribe();
        let counted = self
            .watches
            .start(&self.pool, id)
            .await
            .map_err(ApiError::from)?;
        if let Err(e) = self.load(id).await {
            if counted {
                self.watches.end(&self.pool, id).await;
            }
            return Err(e.into());
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let pool = self.pool.clone();
        let shutdown = self.watches.shutdown.clone();
        let watch = async move {
            let mut seen = 0;
            loop {
                let changes = match store::changes_after(&pool, id, seen).await {
                    Ok(changes) => changes,
                    Err(e) => {
                        let _ = sender.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                };
                for change in changes {
                    seen = change.sequence as i32;
                    let terminal = matches!(
                        api::OrderStatus::try_from(change.status),
                        Ok(api::OrderStatus::Completed | api::OrderStatus::Cancelled)
                    );
                    if sender.send(Ok(change)).await.is_err() || terminal {
                        return; // client gone, or the story is over
                    }
                }
                // Until this order changes (or a lost notification's poll).
                let fallback = tokio::time::sleep(crate::watch::FALLBACK_POLL);
                tokio::pin!(fallback);
                loop {
                    tokio::select! {
                        next = changed.recv() => match next {
                            Ok(changed_id) if changed_id != id => continue,
                            _ => break, // ours, or we lagged: read again
                        },
                        _ = &mut fallback => break,
                        _ = sender.closed() => return,
                        _ = shutdown.cancelled() => {
                            let _ = sender
                                .send(Err(GrpcStatus::unavailable(
                                    "the server is shutting down; watch again to go on",
                                )))
                                .await;
                            return;
                        }
                    }
                }
            }
        };
        let (pool, watches) = (self.pool.clone(), self.watches.clone());
        tokio::spawn(async move {
            let _permit = permit;
            watch.await;
            watches.end(&pool, id).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}
