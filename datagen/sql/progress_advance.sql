-- Move the progress one day on, only from the day this run started from (else another run moved it).
UPDATE datagen_progress SET last_day = ? WHERE world = ? AND last_day = ?
