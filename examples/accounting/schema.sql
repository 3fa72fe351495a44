-- Invoices and payments in one table (see README.md for why): both are
-- documents for a customer with a positive amount.
CREATE TABLE documents (
    id           bigint PRIMARY KEY,
    customer_id  int NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('invoice', 'payment')),
    number       text NOT NULL,
    amount       numeric(14,2) NOT NULL CHECK (amount >= 0),
    issued_on    date NOT NULL
);
