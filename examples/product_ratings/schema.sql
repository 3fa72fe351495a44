-- One row per user and product: a rating of 1 to 5 stars, or NULL when the
-- user wrote a review without rating.
CREATE TABLE ratings (
    id          bigint PRIMARY KEY,
    product_id  int NOT NULL,
    user_id     int NOT NULL,
    stars       smallint CHECK (stars BETWEEN 1 AND 5),
    review      text
);
