//! `cx.gateway.v1.CustomerService`: customers and companies at Retently and Retainly.
//!
//! Each RPC validates its request ([`validation`]), then reads through `App::retently` or, for
//! writes, takes the one write path ([`crate::domain::writes::run`]: SYNC or ASYNC, idempotency
//! keys), which runs the execution in [`crate::domain::writes::customers`] that the outbox
//! worker also replays. Conversions live in [`convert`].

pub mod convert;
pub mod validation;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use self::validation::CustomerLookup;
use crate::app::App;
use crate::error::{Error, ErrorCode, Reason};
use crate::grpc::{paging, write};
use crate::pb;
use crate::upstream::CallContext;
use crate::upstream::retently::{self, CompanyQuery, CustomerQuery, PageRequest};

/// `cx.gateway.v1.CustomerService`.
#[derive(Clone)]
pub struct CustomerApi {
    app: Arc<App>,
}

impl CustomerApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

/// The upstream context of a call: interactive, bounded by the caller's deadline, and spending
/// the caller's fair share of the upstream budget.
fn context<T>(request: &Request<T>) -> CallContext {
    crate::auth::interactive_context(request)
}

fn date_time(seconds: i64) -> Result<DateTime<Utc>, Error> {
    DateTime::from_timestamp(seconds, 0)
        .ok_or_else(|| Error::internal(format!("{seconds} is not a representable instant")))
}

/// Upstream page numbers and sizes in the upstream's terms.
fn page(size: usize, page: u32, sort: &str) -> PageRequest {
    PageRequest {
        page: Some(page),
        // Validation bounds sizes to 1..=1,000.
        limit: Some(u32::try_from(size).unwrap_or(retently::MAX_PAGE_SIZE)),
        sort: Some(sort.to_owned()),
    }
}

/// The token of the page after `page`, when Retently says there is one.
fn next_page<T>(page: &retently::Page<T>, requested: u32) -> Option<i64> {
    page.has_more().then(|| i64::from(requested) + 1)
}

#[tonic::async_trait]
impl pb::customer_service_server::CustomerService for CustomerApi {
    async fn upsert_customers(
        &self,
        request: Request<pb::UpsertCustomersRequest>,
    ) -> Result<Response<pb::UpsertCustomersResponse>, Status> {
        write::serve(&self.app, request, validation::upsert_customers).await
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::GetCustomerResponse>, Status> {
        let ctx = context(&request);
        let lookup = validation::get_customer(request.get_ref())?;
        let customer = match lookup {
            CustomerLookup::RetentlyId(id) => self.app.retently.get_customer(&ctx, &id).await?,
            CustomerLookup::Email(email) => {
                let query = CustomerQuery {
                    email: Some(email),
                    page: PageRequest {
                        page: None,
                        // An exact match: one record at most is expected.
                        limit: Some(1),
                        sort: None,
                    },
                    ..CustomerQuery::default()
                };
                let page = self.app.retently.list_customers(&ctx, query).await?;
                page.items.into_iter().next().ok_or_else(|| {
                    Error::new(
                        ErrorCode::NotFound,
                        Reason::UpstreamNotFound,
                        "retently has no customer with this email",
                    )
                    .with_metadata("upstream", "retently")
                    .with_metadata("status", "200")
                })?
            }
        };
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(convert::customer(&customer)),
        }))
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let ctx = context(&request);
        let list = validation::list_customers(request.get_ref(), Utc::now().timestamp())?;
        let query = CustomerQuery {
            email: list.email.clone(),
            created_from: list.start.map(date_time).transpose()?,
            created_to: Some(date_time(list.end)?),
            page: page(list.size, list.page, list.sort),
        };
        let page = self.app.retently.list_customers(&ctx, query).await?;
        Ok(Response::new(pb::ListCustomersResponse {
            customers: page.items.iter().map(convert::customer).collect(),
            next_page_token: paging::next_pinned_page_token(
                next_page(&page, list.page),
                list.size,
                &list.filters,
                list.end,
            ),
            total_size: page
                .total
                .map_or(0, |total| i64::try_from(total).unwrap_or(i64::MAX)),
        }))
    }

    async fn delete_customers(
        &self,
        request: Request<pb::DeleteCustomersRequest>,
    ) -> Result<Response<pb::DeleteCustomersResponse>, Status> {
        write::serve(&self.app, request, validation::delete_customers).await
    }

    async fn unsubscribe_customers(
        &self,
        request: Request<pb::UnsubscribeCustomersRequest>,
    ) -> Result<Response<pb::UnsubscribeCustomersResponse>, Status> {
        write::serve(&self.app, request, |r: &pb::UnsubscribeCustomersRequest| {
            validation::subscription_change(&r.emails, &r.message, r.options.as_ref())
        })
        .await
    }

    async fn resubscribe_customers(
        &self,
        request: Request<pb::ResubscribeCustomersRequest>,
    ) -> Result<Response<pb::ResubscribeCustomersResponse>, Status> {
        write::serve(&self.app, request, |r: &pb::ResubscribeCustomersRequest| {
            validation::subscription_change(&r.emails, "", r.options.as_ref())
        })
        .await
    }

    async fn upsert_customer_array_items(
        &self,
        request: Request<pb::UpsertCustomerArrayItemsRequest>,
    ) -> Result<Response<pb::UpsertCustomerArrayItemsResponse>, Status> {
        write::serve(&self.app, request, validation::upsert_array_items).await
    }

    async fn delete_customer_array_items(
        &self,
        request: Request<pb::DeleteCustomerArrayItemsRequest>,
    ) -> Result<Response<pb::DeleteCustomerArrayItemsResponse>, Status> {
        write::serve(&self.app, request, validation::delete_array_items).await
    }

    async fn list_companies(
        &self,
        request: Request<pb::ListCompaniesRequest>,
    ) -> Result<Response<pb::ListCompaniesResponse>, Status> {
        let ctx = context(&request);
        let list = validation::list_companies(request.get_ref())?;
        let query = CompanyQuery {
            page: page(list.size, list.page, list.sort),
        };
        let page = self.app.retently.list_companies(&ctx, query).await?;
        Ok(Response::new(pb::ListCompaniesResponse {
            companies: page.items.iter().map(convert::company).collect(),
            next_page_token: paging::next_page_token(
                next_page(&page, list.page),
                list.size,
                &list.filters,
            ),
            total_size: page
                .total
                .map_or(0, |total| i64::try_from(total).unwrap_or(i64::MAX)),
        }))
    }

    async fn get_company(
        &self,
        request: Request<pb::GetCompanyRequest>,
    ) -> Result<Response<pb::GetCompanyResponse>, Status> {
        let ctx = context(&request);
        let key = validation::get_company(request.get_ref())?;
        let company = self.app.retently.company(&ctx, &key).await?;
        Ok(Response::new(pb::GetCompanyResponse {
            company: Some(convert::company(&company)),
        }))
    }
}
