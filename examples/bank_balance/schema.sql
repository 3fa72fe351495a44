-- An account's movements: credits are positive, debits negative. A movement
-- is never deleted by the application; voiding it sets voided_at.
CREATE TABLE movements (
    id          bigint PRIMARY KEY,
    account_id  int NOT NULL,
    amount      numeric(14,2) NOT NULL,
    memo        text,
    booked_at   timestamptz NOT NULL,
    voided_at   timestamptz               -- soft delete: NULL while valid
);
