-- An event applied alone in one statement (crate::inbox, Handler::effect_alone):
-- its inbox insert and its effect run as one statement outside any transaction,
-- which PostgreSQL makes atomic. The statement ends with this check, whose
-- error undoes all of it when the event was seen before (CH001) or its effect
-- did not hold (CH002); the platform then reports a duplicate, or applies the
-- event in a transaction as usual.
CREATE FUNCTION choreo_applied_alone(fresh boolean, held boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT fresh THEN
        RAISE EXCEPTION 'event seen before' USING ERRCODE = 'CH001';
    END IF;
    IF NOT held THEN
        RAISE EXCEPTION 'effect did not hold' USING ERRCODE = 'CH002';
    END IF;
    RETURN true;
END
$$;
