-- Tasks of a project, moving through todo → doing → done (and back).
CREATE TABLE tasks (
    id              bigint PRIMARY KEY,
    project_id      int NOT NULL,
    title           text NOT NULL,
    status          text NOT NULL CHECK (status IN ('todo', 'doing', 'done')),
    estimate_hours  numeric(6,1)          -- NULL: not estimated
);
