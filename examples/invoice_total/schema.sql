-- The essay's demo: invoices with a total, optionally tied to a customer.
CREATE TABLE invoices (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    customer_id int,                      -- NULL: not assigned to a customer yet
    total       numeric(20,2) NOT NULL
);
