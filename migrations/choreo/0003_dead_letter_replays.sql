-- Replays of a parked message that still could not be read.
ALTER TABLE choreo_dead_letter ADD COLUMN replays INT NOT NULL DEFAULT 0;
