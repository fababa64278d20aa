"""What nbdsrv serves over NBD: the export interface, the catalog, file exports, session
exports and dirty-bitmap indexes."""
