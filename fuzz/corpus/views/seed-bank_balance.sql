-- Balance and number of movements per account, voided movements excluded.
-- Voiding a movement takes it out of its account; un-voiding puts it back.
-- `credits` and `debits` split the balance with FILTER: each sums only the
-- movements its condition accepts (NULL when there are none).
CREATE MATERIALIZED VIEW account_balance AS
SELECT account_id,
       SUM(amount) AS balance,
       COUNT(*) AS movements,
       SUM(amount) FILTER (WHERE amount > 0) AS credits,
       SUM(amount) FILTER (WHERE amount < 0) AS debits
FROM movements
WHERE voided_at IS NULL
GROUP BY account_id;
