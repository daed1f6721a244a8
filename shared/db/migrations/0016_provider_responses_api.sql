-- A provider of the `openai` format that also serves the OpenAI Responses API (`POST /responses`, and stored
-- responses by id). The proxy passes /v1/responses through to such providers and translates it to Chat
-- Completions for the others (proxy/dialects/responses.py).
alter table providers add column if not exists responses_api boolean not null default false;
