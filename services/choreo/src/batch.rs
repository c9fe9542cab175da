//! What a handler keeps while one batch is applied: state its
//! [`Handler::before_batch`](crate::Handler::before_batch) sets up, its
//! events' effects use, and its
//! [`Handler::after_batch`](crate::Handler::after_batch) settles, just
//! before the batch commits. Each batch has its own, even where several
//! lanes apply batches at once; an event applied on its own has none, so
//! its effects see [`with`] answer `None` and do their work at once.
use std::any::Any;
use std::cell::RefCell;

tokio::task_local! {
    static KEPT: RefCell<Option<Box<dyn Any + Send>>>;
}

/// Runs `batch` (one batch's transaction) with nothing kept yet.
pub(crate) async fn scope<F: Future>(batch: F) -> F::Output {
    KEPT.scope(RefCell::new(None), batch).await
}

/// Keeps `value` for the rest of the batch being applied, in place of
/// anything kept before. Outside a batch it is dropped.
pub fn keep<T: Any + Send>(value: T) {
    let _ = KEPT.try_with(|kept| *kept.borrow_mut() = Some(Box::new(value)));
}

/// `f` on what the batch being applied keeps, if it keeps a `T`; `None`
/// outside a batch, or where it keeps none.
pub fn with<T: Any, R>(f: impl FnOnce(&mut T) -> R) -> Option<R> {
    KEPT.try_with(|kept| kept.borrow_mut().as_mut()?.downcast_mut().map(f))
        .ok()
        .flatten()
}

/// What the batch being applied keeps, if it is a `T`, taken out of it.
pub fn take<T: Any>() -> Option<T> {
    let kept = KEPT.try_with(|kept| kept.borrow_mut().take()).ok()??;
    kept.downcast().ok().map(|value| *value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_keeps_its_own_value_and_nothing_is_kept_outside_one() {
        keep(1_u32);
        assert_eq!(with(|n: &mut u32| *n), None);
        let inner = scope(async {
            assert_eq!(with(|n: &mut u32| *n), None);
            keep(1_u32);
            assert_eq!(with(|n: &mut u32| *n += 1), Some(()));
            assert_eq!(with(|s: &mut String| s.len()), None, "not a String");
            let other = scope(async { with(|n: &mut u32| *n) }).await;
            assert_eq!(other, None, "another batch keeps its own");
            (take::<u32>(), take::<u32>())
        })
        .await;
        assert_eq!(inner, (Some(2), None));
    }
}
