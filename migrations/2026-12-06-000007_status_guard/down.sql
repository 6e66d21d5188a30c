DROP TRIGGER assets_status_only_through_history ON assets;
DROP FUNCTION assetflow_status_only_through_history();
DROP TRIGGER asset_status_history_moves_the_asset ON asset_status_history;
DROP FUNCTION assetflow_status_follows_history();
DROP TABLE status_transitions;
